"""What pyproject.toml cannot say: optional compiled parts, each skipped (with a warning) when its
compiler is missing, the install succeeding without it.

- relay._hitpath and relay._counter_flush, C extensions: without gcc and Python's headers the
  relay runs its Python hit path (relay/hit_path.py; the supervisor logs which one serves) and
  flushes counters in Python (shm/writer.py).
- relay/ebpf/fastpath.bpf.o, the in-kernel fast path (relay/kernel_path.py), compiled with
  clang for the BPF target: without clang and libbpf-dev the relay forwards every datagram in
  its workers. The object is portable (it reads only packet data and the stable __sk_buff), so
  it is built here, not on the host that runs it.

scripts/bootstrap.sh installs both toolchains on Debian, so the test suite exercises every path.
"""
import os
import shutil
import subprocess
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

C_FLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"]
BPF_SOURCE = "relay/ebpf/fastpath.bpf.c"
BPF_OBJECT = "relay/ebpf/fastpath.bpf.o"


class BuildWithBpf(build_ext):
    def run(self) -> None:
        super().run()
        inplace = self.inplace or getattr(self, "editable_mode", False)
        self.build_bpf(BPF_OBJECT if inplace else os.path.join(self.build_lib, BPF_OBJECT))

    def build_bpf(self, target: str) -> None:
        clang = shutil.which("clang")
        if clang is None:
            print("warning: clang not found: the in-kernel fast path (relay/ebpf) is not built")
            return
        multiarch = sysconfig.get_config_var("MULTIARCH") or ""
        includes = [f"-I/usr/include/{multiarch}"] if multiarch else []
        os.makedirs(os.path.dirname(target), exist_ok=True)
        command = [clang, "-O2", "-g", "-Wall", "-target", "bpf", *includes, "-c", BPF_SOURCE, "-o", target]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            print(f"warning: the in-kernel fast path (relay/ebpf) is not built:\n{result.stderr}")


setup(
    cmdclass={"build_ext": BuildWithBpf},
    ext_modules=[
        Extension(
            "relay._hitpath",
            sources=["relay/_hitpath.c"],
            depends=["relay/_flow_fields.h", "relay/_flow_index.h", "relay/_hitpath_entry.h",
                     "relay/_hitpath_rules.h", "relay/_returnpath.h", "relay/_slots.h"],
            extra_compile_args=C_FLAGS,
            optional=True,
        ),
        Extension(
            "relay._counter_flush",
            sources=["relay/_counter_flush.c"],
            depends=["relay/_slots.h"],
            extra_compile_args=C_FLAGS,
            optional=True,
        ),
    ],
)
