"""The teacher: its DSPy program, the vote over gold embeddings in front of it, and labeling the pool."""
