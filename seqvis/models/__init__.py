"""Pure Flax linen modules: no data, no optimiser, no I/O.

Conventions: layer-level modules take `deterministic: bool` (flax style); whole models
(ViT, ResNet, captioning, video) take `train: bool`. Shapes are in each docstring.
"""
