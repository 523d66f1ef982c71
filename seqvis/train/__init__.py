"""The trainer's machinery: state and step drivers, optimiser, precision, checkpoints, metrics, evaluators."""
