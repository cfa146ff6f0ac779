"""The task's data: loading, label selection, seeded splits (gold, unlabeled pool, devset, test)."""
