"""Analysis: FLOP counting, power-law fits, plots, attention maps."""
