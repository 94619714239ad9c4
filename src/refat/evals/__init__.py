"""Evaluations beyond attack success: utility benchmarks (log-likelihood and GSM8K) and over-refusal."""
