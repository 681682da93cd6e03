"""Benchmarks of cellular-sc (the field benchmark runner is ``python -m benchmarks.run``)."""
