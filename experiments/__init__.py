"""Runnable studies built on seqvis: benchmarks, sweeps, scaling curves."""
