"""The benchmark suite: scripts that write JSON to ``bench/results/`` (see docs/benchmarks.md).

Not an installed package; run the scripts from the repository root
(``python -m bench.run_all`` or ``python bench/<name>.py``).
"""
