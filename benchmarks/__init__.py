"""The benchmark suite: model-swap against its peers and floors in one run (python -m benchmarks)."""
