"""The one thing pyproject.toml cannot say: relay._fastpath, an optional C extension.

``optional=True``: without a C compiler and Python's headers the install still succeeds and the
relay runs its Python path (relay/worker.py logs which one serves). scripts/bootstrap.sh
installs both on Debian, so the test suite always exercises the C path as well.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "relay._fastpath",
            sources=["relay/_fastpath.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
