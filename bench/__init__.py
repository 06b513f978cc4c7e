"""Benchmarks: each script prints a table and appends it, with its command and machine, to docs/benchmarks.md."""
