"""Evaluation: the classical baselines, the four student variants with BFRS, latency, and the charts."""
