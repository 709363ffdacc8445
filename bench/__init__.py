"""Benchmarks: each prints a table and writes JSON; run as `python -m bench.NAME`."""
