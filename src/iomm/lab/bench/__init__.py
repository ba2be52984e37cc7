"""Benchmarks: the code `iomm bench` runs (`train_step`, `sampling`, `speedups`) and the one-off probes
(`probes`, each `python -m iomm.lab.bench.probes.NAME`; their results and write-ups are in the repo's `bench/`).
Nothing in the library core imports this package; it sits above the testbed (`iomm.nano`), which the probes use.
"""
