"""libbpf (the system's libbpf.so.1) through ctypes: load a BPF object, attach a TC program, and
read and write maps. The thin I/O shell under relay/kernel_path.py and relay/kernel_flows.py.

Why ctypes and not a binding: the calls needed are a dozen plain C functions of a stable ABI
(libbpf 1.x), and a Python package would add a build (bcc needs LLVM at run time; libbpf's
own Python bindings are not packaged for Debian or PyPI). Every call that fails raises
:class:`BpfError` naming the call and the errno.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterable

BPF_TC_INGRESS = 1
BPF_TC_F_REPLACE = 1
BPF_ANY = 0


class BpfError(OSError):
    """A libbpf call failed: ``str()`` names the call and the reason."""


class _TcHook(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("ifindex", ctypes.c_int), ("attach_point", ctypes.c_int),
                ("parent", ctypes.c_uint32)]


class _TcOpts(ctypes.Structure):
    _fields_ = [("sz", ctypes.c_size_t), ("prog_fd", ctypes.c_int), ("flags", ctypes.c_uint32),
                ("prog_id", ctypes.c_uint32), ("handle", ctypes.c_uint32), ("priority", ctypes.c_uint32)]


@functools.cache
def libbpf() -> ctypes.CDLL:
    """The loaded library (BpfError where there is none)."""
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfError(f"libbpf is not installed ({exc}): apt install libbpf1") from None
    vp, ci, cu, cs = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_char_p
    for fn, res, args in (
        ("bpf_object__open_file", vp, [cs, vp]),
        ("bpf_object__load", ci, [vp]),
        ("bpf_object__close", None, [vp]),
        ("bpf_object__find_map_by_name", vp, [vp, cs]),
        ("bpf_object__find_program_by_name", vp, [vp, cs]),
        ("bpf_map__set_max_entries", ci, [vp, cu]),
        ("bpf_map__fd", ci, [vp]),
        ("bpf_program__fd", ci, [vp]),
        ("bpf_tc_hook_create", ci, [vp]),
        ("bpf_tc_attach", ci, [vp, vp]),
        ("bpf_tc_detach", ci, [vp, vp]),
        ("bpf_map_update_elem", ci, [ci, vp, vp, ctypes.c_uint64]),
        ("bpf_map_lookup_elem", ci, [ci, vp, vp]),
        ("bpf_map_delete_elem", ci, [ci, vp]),
        ("bpf_map_get_next_key", ci, [ci, vp, vp]),
        ("libbpf_num_possible_cpus", ci, []),
        ("libbpf_set_print", vp, [vp]),
    ):
        f = getattr(lib, fn)
        f.restype, f.argtypes = res, args
    lib.libbpf_set_print(None)  # its own messages would go to stderr: errors are raised here
    return lib


def _check(result: int, what: str) -> int:
    if result < 0:
        err = -result if result != -1 else ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return result


def possible_cpus() -> int:
    return _check(libbpf().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


class BpfObject:
    """A loaded BPF object file. ``max_entries`` sizes maps before the load."""

    def __init__(self, path: str, max_entries: dict[str, int] | None = None) -> None:
        lib = libbpf()
        ctypes.set_errno(0)
        obj = lib.bpf_object__open_file(path.encode(), None)
        if not obj:
            err = ctypes.get_errno() or 2
            raise BpfError(err, f"open {path}: {os.strerror(err)}")
        self._obj: int | None = obj
        try:
            for name, entries in (max_entries or {}).items():
                _check(lib.bpf_map__set_max_entries(self._map(name), entries), f"size map {name}")
            _check(lib.bpf_object__load(obj), f"load {os.path.basename(path)}")
        except BaseException:
            self.close()
            raise

    def _map(self, name: str) -> int:
        found = libbpf().bpf_object__find_map_by_name(self._obj, name.encode())
        if not found:
            raise BpfError(2, f"map {name}: not in the object")
        return int(found)

    def map_fd(self, name: str) -> int:
        return _check(libbpf().bpf_map__fd(self._map(name)), f"map {name}")

    def program_fd(self, name: str) -> int:
        prog = libbpf().bpf_object__find_program_by_name(self._obj, name.encode())
        if not prog:
            raise BpfError(2, f"program {name}: not in the object")
        return _check(libbpf().bpf_program__fd(prog), f"program {name}")

    def close(self) -> None:
        """Closes the object's fds: an attached program and the maps it uses stay in the kernel
        for as long as something holds them (the filter, a worker's inherited fd)."""
        if self._obj is not None:
            libbpf().bpf_object__close(self._obj)
            self._obj = None


def _hook(ifindex: int) -> _TcHook:
    return _TcHook(ctypes.sizeof(_TcHook), ifindex, BPF_TC_INGRESS, 0)


def tc_attach(ifindex: int, prog_fd: int, handle: int, priority: int) -> None:
    """The program as the (handle, priority) filter of ``ifindex``'s clsact ingress hook,
    replacing whatever a previous relay left there (a crash cannot leave two)."""
    lib = libbpf()
    hook = _hook(ifindex)
    result = lib.bpf_tc_hook_create(ctypes.byref(hook))
    if result < 0 and result != -17:  # EEXIST: the clsact qdisc is there (another filter's, or ours)
        _check(result, f"clsact qdisc on ifindex {ifindex}")
    opts = _TcOpts(ctypes.sizeof(_TcOpts), prog_fd, BPF_TC_F_REPLACE, 0, handle, priority)
    _check(lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts)), f"attach to ifindex {ifindex}")


def tc_detach(ifindex: int, handle: int, priority: int) -> bool:
    """Remove the (handle, priority) filter; False when it was not there (or the interface went)."""
    opts = _TcOpts(ctypes.sizeof(_TcOpts), 0, 0, 0, handle, priority)
    return libbpf().bpf_tc_detach(ctypes.byref(_hook(ifindex)), ctypes.byref(opts)) == 0


class MapIO:
    """One map's element calls on a file descriptor (the maps are created by the supervisor;
    workers inherit the fds)."""

    __slots__ = ("fd", "key_size", "value_size", "_value", "_update", "_lookup", "_delete")

    def __init__(self, fd: int, key_size: int, value_size: int) -> None:
        lib = libbpf()
        self.fd = fd
        self.key_size = key_size
        self.value_size = value_size
        self._value = ctypes.create_string_buffer(value_size)
        self._update, self._lookup = lib.bpf_map_update_elem, lib.bpf_map_lookup_elem
        self._delete = lib.bpf_map_delete_elem

    def update(self, key: bytes, value: bytes) -> None:
        _check(self._update(self.fd, key, value, BPF_ANY), "map update")

    def lookup(self, key: bytes) -> bytes | None:
        result = self._lookup(self.fd, key, self._value)
        if result < 0:
            if -result == 2 or (result == -1 and ctypes.get_errno() == 2):
                return None  # ENOENT
            _check(result, "map lookup")
        return self._value.raw

    def delete(self, key: bytes) -> bool:
        """False: the key was not there."""
        result = self._delete(self.fd, key)
        if result < 0 and not (-result == 2 or (result == -1 and ctypes.get_errno() == 2)):
            _check(result, "map delete")
        return result == 0

    def update_many(self, items: Iterable[tuple[bytes, bytes]]) -> None:
        for key, value in items:
            self.update(key, value)

    def all_keys(self) -> list[bytes]:
        """Every key, read at once (a hash map's order; a key deleted meanwhile may restart the
        walk: callers take this as a snapshot)."""
        found: list[bytes] = []
        nxt = ctypes.create_string_buffer(self.key_size)
        key = None
        get_next = libbpf().bpf_map_get_next_key
        while get_next(self.fd, key, nxt) == 0 and len(found) < 1 << 24:
            found.append(nxt.raw)
            key = ctypes.create_string_buffer(nxt.raw, self.key_size)
        return found
