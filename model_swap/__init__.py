"""Shared pieces of model-swap: names, errors, digests, serving, the RDMA protocol."""

__version__ = "0.1.0"
