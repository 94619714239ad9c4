"""Benchmarks for refat: hook overhead and generation throughput (run with ``python -m bench``)."""
