"""Benchmarks for refat (run with ``python -m bench``; see BENCHMARKS.md): hooks, generation, training step,
extraction, roofline, memory, and the opt-in GCG-vs-nanoGCG comparison."""
