"""Benchmarks: run with ``nox -s bench -- --size 100k`` (see README.md here)."""
