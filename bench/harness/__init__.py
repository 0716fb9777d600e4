"""Plumbing shared by the bench scripts: processes started in their own process group and
stopped by group (processes), what /proc says about a process (procinfo), CPU accounting
(cpu), free ports (ports), the relay's config files (relay_files), and BenchError (errors).

A package of its own: a flat bench/NAME.py may shadow a top-level package of the project when
a bench script runs (bench/ is first on sys.path then), a module in here cannot.
"""
