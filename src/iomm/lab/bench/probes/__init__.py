"""One-off probes of the nano testbed and the library, each run as `python -m iomm.lab.bench.probes.NAME ...`;
each writes a JSON whose first field is its own command line (bench/README.md; results in bench/results/)."""
