"""The lab: the studies of the paper's findings on the nano testbed (`iomm study`), the benchmarks `iomm bench`
runs and the probes along the condition path (`python -m iomm.lab.bench.probes.NAME`). It imports the library and
the testbed; of those, only the command line imports it (`tests/test_structure.py`)."""
