"""Benchmarks (``sgl-adaptive bench``); installed as ``sgl_adaptive.bench``."""
