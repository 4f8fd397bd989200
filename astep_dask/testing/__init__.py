"""Synthetic ASTEP nights whose truth is known (:mod:`.simulate`), for tests, benchmarks,
notebooks and the demo."""
