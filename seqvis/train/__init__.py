"""The shared trainer: state, optimiser, parallel step, checkpoints, metrics, logging."""
