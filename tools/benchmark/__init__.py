"""The parts of tools/bench.py, one module per phase of a benchmark run (see its docstring)."""
