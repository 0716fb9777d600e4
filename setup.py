"""The one thing pyproject.toml cannot say: relay._hitpath, an optional C extension.

``optional=True``: without a C compiler and Python's headers the install still succeeds and the
relay runs its Python hit path (relay/hit_path.py; the supervisor logs which one serves).
scripts/bootstrap.sh installs both on Debian, so the test suite always exercises the C path as well.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "relay._hitpath",
            sources=["relay/_hitpath.c"],
            depends=["relay/_hitpath_entry.h", "relay/_hitpath_rules.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
