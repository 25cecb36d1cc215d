"""Benchmarks: each figure is a ratio against a plain baseline measured in the same run (`make bench`)."""
