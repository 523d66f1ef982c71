"""Residual networks (He et al. 2016): ResNet v1.5 with BatchNorm, and BiT-style GroupNorm + WS.

Over 400 lines on purpose: one network family in one file; ~190 lines are code, the rest equations and parameter names.

A residual block learns a correction F to the identity instead of the whole map::

    y = relu(s(x) + F(x))

where ``s`` is the shortcut: the identity when ``x`` already has the block's output shape,
otherwise a projection ``s(x) = N(conv1x1_stride(x))`` (N is the block's normalisation).
Because the identity path carries the signal and its gradient unchanged, very deep stacks
stay trainable; if F is zero the block passes ``relu(x)`` through.

Two kinds of F (conv_k = k×k convolution without bias, N = normalisation, r = relu)::

    basic       F(x) = N(conv3x3(r(N(conv3x3_stride(x)))))                  C -> C
    bottleneck  F(x) = N(conv1x1(r(N(conv3x3_stride(r(N(conv1x1(x))))))))  C -> 4C

The bottleneck squeezes to C channels with a 1×1 conv, does the spatial 3×3 conv on the
cheap C-channel tensor, and expands back to 4C. "v1.5" means the stride of a downsampling
bottleneck sits on its 3×3 conv (torchvision, the Flax ImageNet example), not on the first
1×1 conv as in the original paper, which would throw away 3/4 of the positions unseen.

The network is a stem, then stages of blocks, then (for :class:`ResNet`) a classifier::

    stem 'imagenet'   7×7/2 conv, N, relu, 3×3/2 max-pool    [B, H, W, C] -> [B, H/4, W/4, w]
    stem 'small'      3×3/1 conv, N, relu (CIFAR, MNIST)     [B, H, W, C] -> [B, H,   W,   w]
    stage i           n_i blocks at width w·2^i (×4 for bottlenecks); the first block of
                      every stage but the first has stride 2 and a projection shortcut
    head              global average pool, Dense             [B, h, w, c] -> [B, num_classes]

With 4 stages the feature map is ``[B, H/32, W/32, c]`` after the ImageNet stem and
``[B, H/8, W/8, c]`` after the small stem (sizes round up), with ``c = 8w`` for basic blocks
and ``c = 32w`` for bottlenecks (512 and 2048 at w = 64).

Depths are a table (:data:`ARCHS`); ``stage_sizes`` overrides the block counts, with
``depth`` still choosing the block kind. The ViT paper's hybrid R50+ViT uses the ResNet-50
trunk with stages (3, 4, 9): three stages, total stride 16, 1024 channels.

Normalisation (``norm``):

- ``'batch'``: BatchNorm, ``N(x) = γ (x − μ) / sqrt(σ² + ε) + β`` per channel, with μ, σ²
  the batch statistics in training and running averages (collection ``batch_stats``,
  momentum 0.9, ε = 1e-5 as in torchvision) in evaluation. ``bn_axis_name`` names the
  pmap/shard_map axis over which the batch statistics are averaged across devices.
- ``'group'``: as in BiT (Kolesnikov et al. 2020) and the ViT hybrids: GroupNorm (32 groups;
  statistics per example over groups of channels, so nothing depends on the batch) and
  weight-standardised convolutions (:class:`StdConv`). The block layout stays v1.5
  (post-activation), which is what the ViT hybrids use; BiT's own pre-activation (v2)
  ordering is not implemented here.

The last N of every residual branch has its scale γ initialised to zero
(``zero_init_residual``, Goyal et al. 2017), so at initialisation every block is
``relu(s(x))`` and the network starts shallow.

Parameter names (stable; the group-norm layout is the one of the published ViT-hybrid /
BiT Flax checkpoints): ``conv_root``, ``{bn|gn}_root``, ``block{i}/unit{j}/conv{k}``,
``block{i}/unit{j}/{bn|gn}{k}``, ``block{i}/unit{j}/conv_proj`` and ``{bn|gn}_proj``,
numbered from 1, then ``head`` for :class:`ResNet`. A :class:`ResNet` has exactly the
parameters of the :class:`ResNetEncoder` with the same settings plus ``head``, so a trained
classifier's trunk loads into an encoder by dropping ``head``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class Arch:
    """A depth's block kind ('basic' or 'bottleneck') and number of blocks per stage."""

    block: str
    stage_sizes: tuple[int, ...]


# depth: block kind and blocks per stage, as published (He et al. 2016 Table 1; R26 from BiT/ViT).
ARCHS: dict[int, Arch] = {
    18: Arch("basic", (2, 2, 2, 2)),
    26: Arch("bottleneck", (2, 2, 2, 2)),
    34: Arch("basic", (3, 4, 6, 3)),
    50: Arch("bottleneck", (3, 4, 6, 3)),
    101: Arch("bottleneck", (3, 4, 23, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}  # output channels of a block / its width
NORMS = ("batch", "group")
STEMS = ("imagenet", "small")
PADDINGS = ("symmetric", "same")

# He-normal on fan-out, as torchvision initialises ResNet convolutions.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# ---------------------------------------------------------------------- layers


def standardize_weight(kernel: Array, eps: float = 1e-5) -> Array:
    """Weight standardisation of a conv kernel ``[kh, kw, cin, cout]``, per output channel.

    ``W' = (W − mean(W)) / (std(W) + eps)`` with mean and (biased) standard deviation over
    ``(kh, kw, cin)``, so each output channel's filter has zero mean and unit variance. The
    epsilon is added to the standard deviation and is 1e-5, as in the official ViT-hybrid
    and BiT code (``vit_jax/models_resnet.py``, ``big_vision/models/bit.py``), so published
    GroupNorm+WS weights give the published outputs. Computed in float32, returned in the
    kernel's dtype.
    """
    w = kernel.astype(jnp.float32)
    mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
    std = jnp.sqrt(jnp.mean(jnp.square(w - mean), axis=(0, 1, 2), keepdims=True))
    return ((w - mean) / (std + eps)).astype(kernel.dtype)


class StdConv(nn.Conv):
    """``nn.Conv`` whose kernel is weight-standardised on every call (Qiao et al. 2019).

    The stored parameter ``kernel [kh, kw, cin, cout]`` is the raw W; the convolution uses
    ``W' = (W − mean) / (std + ws_eps)``, mean and standard deviation over ``(kh, kw, cin)``
    for each output channel (:func:`standardize_weight`). The output is therefore unchanged by
    ``W -> a·W + b`` for any a > 0 and b per output channel (up to ws_eps); paired with
    GroupNorm this replaces BatchNorm's smoothing of the loss landscape without batch statistics.
    Shapes are those of ``nn.Conv``: ``[B, H, W, cin] -> [B, H', W', cout]``.
    """

    ws_eps: float = 1e-5

    def param(self, name: str, init_fn, *init_args, **init_kwargs):
        value = super().param(name, init_fn, *init_args, **init_kwargs)
        if name == "kernel":
            value = standardize_weight(value, self.ws_eps)
        return value


@dataclasses.dataclass(frozen=True)
class Layers:
    """How a network builds its convolutions and normalisations (shared by all blocks).

    Attributes:
      norm: 'batch' (nn.Conv + BatchNorm) or 'group' (StdConv + GroupNorm).
      num_groups: GroupNorm groups (norm='group').
      bn_momentum, bn_axis_name: BatchNorm running-average decay and cross-device axis.
      zero_init_residual: start each residual branch's last norm scale at 0 (F(x) = 0).
      padding: 'symmetric' ((k−1)/2 on every side, torchvision) or 'same' (XLA SAME).
      dtype, param_dtype: computation and parameter dtypes.
    """

    norm: str = "batch"
    num_groups: int = 32
    bn_momentum: float = 0.9
    bn_axis_name: str | None = None
    zero_init_residual: bool = True
    padding: str = "symmetric"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def conv(self, features: int, kernel: int, strides: int, name: str) -> nn.Module:
        """A bias-free k×k conv: StdConv for norm='group', else nn.Conv.

        Build it inside a compact method: it becomes a child of the module being built.
        """
        if self.padding == "same":
            padding: Any = "SAME"  # any odd remainder of the padding goes bottom/right
        else:
            p = (kernel - 1) // 2
            padding = ((p, p), (p, p))
        cls = StdConv if self.norm == "group" else nn.Conv
        return cls(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                   use_bias=False, kernel_init=_CONV_INIT, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

    def normalize(self, suffix: str, train: bool, zero_scale: bool = False) -> nn.Module:
        """BatchNorm named ``bn{suffix}`` or GroupNorm named ``gn{suffix}``."""
        scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
        if self.norm == "batch":
            return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                epsilon=1e-5, axis_name=self.bn_axis_name, scale_init=scale_init,
                                dtype=self.dtype, param_dtype=self.param_dtype, name=f"bn{suffix}")
        return nn.GroupNorm(num_groups=self.num_groups, scale_init=scale_init, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=f"gn{suffix}")

    def shortcut(self, x: Array, out: int, strides: int, train: bool) -> Array:
        """s(x): the identity if the shape already matches, else N_proj(conv_proj_1x1_stride(x))."""
        if x.shape[-1] == out and strides == 1:
            return x
        return self.normalize("_proj", train)(self.conv(out, 1, strides, "conv_proj")(x))


# ---------------------------------------------------------------------- blocks


class BasicBlock(nn.Module):
    """Two 3×3 convs: ``[B, H, W, C] -> [B, H/s, W/s, features]``.

    ``y = relu(s(x) + N2(conv2(relu(N1(conv1(x))))))``, with ``conv1`` 3×3 stride s,
    ``conv2`` 3×3 stride 1, and the shortcut s(x) the identity or ``N_proj(conv_proj(x))``.

    Attributes:
      features: output channels (and width of both convs).
      strides: s, the spatial stride of ``conv1`` and of the projection.
      layers: conv/norm settings (:class:`Layers`).
    """

    features: int
    strides: int = 1
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        L = self.layers
        y = L.conv(self.features, 3, self.strides, "conv1")(x)
        y = nn.relu(L.normalize("1", train)(y))
        y = L.conv(self.features, 3, 1, "conv2")(y)
        y = L.normalize("2", train, zero_scale=L.zero_init_residual)(y)
        return nn.relu(L.shortcut(x, self.features, self.strides, train) + y)


class BottleneckBlock(nn.Module):
    """1×1 squeeze, 3×3, 1×1 expand: ``[B, H, W, C] -> [B, H/s, W/s, 4·features]``.

    ``y = relu(s(x) + N3(conv3(relu(N2(conv2(relu(N1(conv1(x)))))))))`` with ``conv1``
    1×1 to ``features``, ``conv2`` 3×3 stride s (v1.5), ``conv3`` 1×1 to ``4·features``.
    Attributes as in :class:`BasicBlock`; ``features`` is the inner (squeezed) width.
    """

    features: int
    strides: int = 1
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        L = self.layers
        out = self.features * EXPANSION["bottleneck"]
        y = L.conv(self.features, 1, 1, "conv1")(x)
        y = nn.relu(L.normalize("1", train)(y))
        y = L.conv(self.features, 3, self.strides, "conv2")(y)
        y = nn.relu(L.normalize("2", train)(y))
        y = L.conv(out, 1, 1, "conv3")(y)
        y = L.normalize("3", train, zero_scale=L.zero_init_residual)(y)
        return nn.relu(L.shortcut(x, out, self.strides, train) + y)


BLOCKS = {"basic": BasicBlock, "bottleneck": BottleneckBlock}


class ResNetStage(nn.Module):
    """``num_blocks`` blocks named ``unit1..``; the first has stride ``strides``.

    ``[B, H, W, C] -> [B, H/s, W/s, features·expansion]``.
    """

    block: str
    num_blocks: int
    features: int
    strides: int = 1
    layers: Layers = Layers()

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        for j in range(self.num_blocks):
            x = BLOCKS[self.block](self.features, self.strides if j == 0 else 1, self.layers,
                                   name=f"unit{j + 1}")(x, train=train)
        return x


# ---------------------------------------------------------------------- networks


class ResNetEncoder(nn.Module):
    """ResNet trunk: ``images [B, H, W, C] -> feature map [B, ceil(H/S), ceil(W/S), c]``.

    S = :meth:`output_stride` (32 for the ImageNet stem with 4 stages, 8 for the small
    stem, 16 for the 3-stage hybrid trunk) and c = :meth:`num_features`. Used on its own
    for captioning (the feature map is the set of attended regions), video frame encoders
    and the R+ViT hybrids.

    Attributes:
      depth: 18, 26, 34, 50 or 101 (:data:`ARCHS`); picks the block kind and, unless
        ``stage_sizes`` is given, the number of blocks per stage.
      stage_sizes: blocks per stage, overriding the table (e.g. (3, 4, 9) for R50 hybrids).
      norm: 'batch' (ResNet v1.5) or 'group' (BiT-style GroupNorm + StdConv).
      stem: 'imagenet' (7×7/2 conv + 3×3/2 max-pool) or 'small' (3×3/1 conv, no pool).
      width: channels of the stem and of the first stage's convs (w; stage i uses w·2^i).
      num_groups: GroupNorm groups; ``width`` must be a multiple of it.
      zero_init_residual: zero-initialise the scale of each block's last norm.
      padding: 'symmetric' (torchvision) or 'same' (XLA SAME, as the JAX ViT-hybrid
        checkpoints were trained); output shapes are the same, pixel alignment differs.
      bn_axis_name: device axis name passed to BatchNorm's ``axis_name`` (e.g. 'batch'
        under pmap), so that training batch statistics are averaged across devices.
      bn_momentum: decay of BatchNorm's running averages.
      dtype, param_dtype: computation and parameter dtypes.

    ``__call__(x, train=False)``: ``train`` makes BatchNorm use (and update, when
    ``batch_stats`` is mutable) batch statistics; in evaluation it uses the running ones.
    """

    depth: int = 50
    stage_sizes: Sequence[int] | None = None
    norm: str = "batch"
    stem: str = "imagenet"
    width: int = 64
    num_groups: int = 32
    zero_init_residual: bool = True
    padding: str = "symmetric"
    bn_axis_name: str | None = None
    bn_momentum: float = 0.9
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        self.check_config()

    # ------------------------------------------------------------------ checks
    def arch(self) -> Arch:
        """Block kind and blocks per stage after applying ``stage_sizes``."""
        base = ARCHS[self.depth]
        sizes = base.stage_sizes if self.stage_sizes is None else tuple(int(n) for n in self.stage_sizes)
        return Arch(base.block, sizes)

    def check_config(self) -> None:
        """Raise a clear ValueError for settings that cannot work (no tracing needed)."""
        name = type(self).__name__
        if self.depth not in ARCHS:
            raise ValueError(
                f"{name} depth={self.depth!r} is unknown; valid depths: "
                f"{', '.join(map(str, ARCHS))} (pass stage_sizes to change the blocks per stage).")
        if self.norm not in NORMS:
            raise ValueError(f"{name} norm={self.norm!r} is unknown; use one of {NORMS}.")
        if self.stem not in STEMS:
            raise ValueError(
                f"{name} stem={self.stem!r} is unknown; use one of {STEMS} ('imagenet' for "
                "large images, 'small' for 28-64 px images such as CIFAR or Fashion-MNIST).")
        if self.padding not in PADDINGS:
            raise ValueError(f"{name} padding={self.padding!r} is unknown; use one of {PADDINGS}.")
        if self.stage_sizes is not None:
            sizes = tuple(self.stage_sizes)
            if not sizes or any(int(n) != n or n < 1 for n in sizes):
                raise ValueError(
                    f"{name} stage_sizes={sizes} must be a non-empty sequence of positive "
                    "block counts, e.g. (3, 4, 6, 3).")
        if self.width < 1:
            raise ValueError(f"{name} width={self.width} must be positive.")
        if self.norm == "group" and self.width % self.num_groups:
            raise ValueError(
                f"{name} norm='group' splits channels into num_groups={self.num_groups} groups, "
                f"but width={self.width} is not a multiple of it; use a width that is a "
                f"multiple of {self.num_groups} or set num_groups to a divisor of {self.width}.")

    def layers(self) -> Layers:
        """The conv/norm settings handed to every block."""
        return Layers(norm=self.norm, num_groups=self.num_groups, bn_momentum=self.bn_momentum,
                      bn_axis_name=self.bn_axis_name, zero_init_residual=self.zero_init_residual,
                      padding=self.padding, dtype=self.dtype, param_dtype=self.param_dtype)

    def output_stride(self) -> int:
        """Total downsampling from pixels to the feature map (ceil division)."""
        stem = 4 if self.stem == "imagenet" else 1
        return stem * 2 ** (len(self.arch().stage_sizes) - 1)

    def num_features(self) -> int:
        """Channels c of the output feature map."""
        arch = self.arch()
        return self.width * 2 ** (len(arch.stage_sizes) - 1) * EXPANSION[arch.block]

    def check_input(self, shape: Sequence[int]) -> None:
        """Raise a clear ValueError for inputs that are not ``[B, H, W, C]`` or too small."""
        name = type(self).__name__
        if len(shape) != 4:
            raise ValueError(f"{name} expects images [batch, H, W, C], got shape {tuple(shape)}.")
        h, w = int(shape[1]), int(shape[2])
        stride = self.output_stride()
        if min(h, w) >= stride:
            return
        n = len(self.arch().stage_sizes)
        if self.stem == "imagenet":
            small = stride // 4
            fix = (f"use stem='small' (3x3/1 conv, no pool: total stride {small}) for small images"
                   if min(h, w) >= small else f"resize the images to at least {stride} px")
        else:
            fix = f"resize the images to at least {stride} px or use fewer stages (stage_sizes)"
        raise ValueError(
            f"{name}: images of {h}x{w} px are smaller than the total stride {stride} of "
            f"stem={self.stem!r} with {n} stages, so the last stages would see less than one "
            f"pixel of real image; {fix}.")

    # ------------------------------------------------------------------ model
    def trunk(self, x: Array, train: bool) -> Array:
        """Stem and stages; builds the layers inline, so call it from a compact method."""
        self.check_input(x.shape)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(
                f"{type(self).__name__} expects float images, got {x.dtype}; convert and "
                "normalise pixels in the input pipeline.")
        L = self.layers()
        if self.stem == "imagenet":
            x = L.conv(self.width, 7, 2, "conv_root")(x)
            x = nn.relu(L.normalize("_root", train)(x))
            pool_pad: Any = "SAME" if self.padding == "same" else ((1, 1), (1, 1))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=pool_pad)
        else:
            x = L.conv(self.width, 3, 1, "conv_root")(x)
            x = nn.relu(L.normalize("_root", train)(x))

        arch = self.arch()
        for i, n in enumerate(arch.stage_sizes):
            x = ResNetStage(arch.block, n, self.width * 2**i, 1 if i == 0 else 2, L,
                            name=f"block{i + 1}")(x, train=train)
        return x

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        return self.trunk(x, train)


class ResNet(ResNetEncoder):
    """ResNet classifier: ``images [B, H, W, C] -> logits [B, num_classes]`` (float32).

    The :class:`ResNetEncoder` trunk (all its attributes apply), then global average
    pooling ``[B, h, w, c] -> [B, c]`` and a Dense head.

    Attributes (besides the encoder's):
      num_classes: head size; None returns the pooled features ``[B, c]``.
      head_zero_init: zero-initialise the head kernel (common for fine-tuning); by default
        it is LeCun-normal, as for training from scratch.

    ``__call__(x, train=False, return_features=False)`` returns logits, or
    ``(logits, feature_map [B, h, w, c])`` when ``return_features``.
    """

    num_classes: int | None = 1000
    head_zero_init: bool = False

    @nn.compact
    def __call__(self, x: Array, train: bool = False, return_features: bool = False):
        features = self.trunk(x, train)
        y = jnp.mean(features, axis=(1, 2))
        if self.num_classes is not None:
            kinit = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
            y = nn.Dense(self.num_classes, kernel_init=kinit, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="head")(y)
        y = y.astype(jnp.float32)
        return (y, features) if return_features else y
