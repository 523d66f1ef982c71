"""Weights in and out: seqvis workdirs, big_vision/AugReg ``.npz`` files, timm ``.safetensors``."""
