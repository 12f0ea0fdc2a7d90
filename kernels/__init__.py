"""Triton kernels of trace-ds, installed as ``trace_ds.kernels`` (a top-level ``kernels`` clashes on PyPI)."""
