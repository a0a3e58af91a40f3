"""The code of ``benchmarks/bench_step.py`` (the entry point; see its docstring for the modules)."""
