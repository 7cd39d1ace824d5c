"""Benchmarks of Cortexx Stream, each against baselines measured in the same run (see BENCHMARKS.md)."""
