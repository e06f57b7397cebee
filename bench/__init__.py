"""Benchmarks of dabnet-kernels: op micro-benchmarks, DABNet inference and training.

Entry points: ``python -m bench.run`` (everything this machine can run, results in bench/results),
``python -m bench.quick`` (the short ops-vs-reference table), ``python -m bench.report`` (README's
summary table and bench/README.md's full tables, from the results files), ``python -m
bench.sass`` (a static performance MODEL of the kernels on sm_90, no GPU needed) and ``pytest bench/
--benchmark-only`` (pytest-benchmark suite). Methods and notes: bench/README.md.
"""
