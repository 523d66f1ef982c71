"""Vision Transformer (Dosovitskiy et al. 2021): an image as a sequence of patches.

An image ``x [batch, H, W, C]`` is cut into N = (H/p)·(W/p) non-overlapping p×p patches;
each is flattened and linearly projected to D dimensions (a p×p conv with stride p is the
same map, and is what is computed). A learned class token is prepended, position
embeddings are added, and a transformer encoder mixes the tokens::

    z_0 = [x_cls; x_1 E; ...; x_N E] + E_pos          [batch, 1 + N, D]
    z_L = Encoder(z_0)                                  L pre-LN blocks
    y   = head(LN(z_L)[:, 0])                           [batch, num_classes]

With ``pool='gap'`` there is no class token and ``y = head(mean_i z_L[:, i])``; with
``pool='map'`` (multihead attention pooling, Zhai et al. 2022) there is no class token either and
a learned probe attends over the encoder output (:class:`MAPHead`). Position embeddings are
learned (default) or the fixed 2-D sin-cos table. An optional pre-logits
layer ``tanh(W y + b)`` sits before the head (used for ImageNet-21k pre-training).
A hybrid (``R50+B/16``) replaces the patch pixels by a ResNet feature map and uses 1×1 patches.

Named variants are a table (ViT paper Table 1, Scaling ViT Table 2); ``build("B/16")``
gives ViT-B with 16×16 patches. Parameter names follow the published checkpoints
(``embedding``, ``cls``, ``Transformer/posembed_input/pos_embedding``,
``Transformer/encoderblock_i``, ``Transformer/encoder_norm``, ``pre_logits``, ``head``); the MAP
head follows big_vision's (``MAPHead_0/probe``, ``MAPHead_0/MultiHeadDotProductAttention_0``,
``MAPHead_0/LayerNorm_0``, ``MAPHead_0/MlpBlock_0``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from seqvis.models.resnet import ResNetEncoder  # the trunk of the hybrids
from seqvis.models.attention import MultiHeadAttention
from seqvis.models.transformer import Encoder, MlpBlock
from seqvis.utils import pair

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class Variant:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int


# name: width / depth / MLP / heads, as published.
VARIANTS: dict[str, Variant] = {
    "mu": Variant(32, 1, 128, 2),
    "s": Variant(256, 6, 1024, 8),
    "Ti": Variant(192, 12, 768, 3),
    "S": Variant(384, 12, 1536, 6),
    "M": Variant(512, 12, 2048, 8),
    "B": Variant(768, 12, 3072, 12),
    "L": Variant(1024, 24, 4096, 16),
    "H": Variant(1280, 32, 5120, 16),
    "g": Variant(1408, 40, 6144, 16),
    "G": Variant(1664, 48, 8192, 16),
}

# ResNet trunks for hybrids, by name and effective patch size (= trunk stride, 1x1 patches on
# the trunk), as published: R50+B/16 is R50 with its 4th stage removed and the 3rd stage
# extended to 9 blocks (stride 16); the /32 hybrids (R26+S/32, R26+B/32, R50+L/32) keep 4 stages.
HYBRID_TRUNKS: dict[str, dict[int, tuple[int, ...]]] = {
    "R26": {16: (2, 2, 2), 32: (2, 2, 2, 2)},
    "R50": {16: (3, 4, 9), 32: (3, 4, 6, 3)},
}

POOLS = ("token", "gap", "map")
POSEMBS = ("learned", "sincos2d")


def sincos_2d_posemb(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding ``[1, h*w, width]`` (row-major grid).

    A quarter of the channels each hold sin(x·ω_k), cos(x·ω_k), sin(y·ω_k), cos(y·ω_k)
    with ω_k = temperature^(-k/(width/4)), k = 0 .. width/4 - 1.
    """
    if width % 4:
        raise ValueError(f"sincos2d position embedding needs width divisible by 4, got {width}.")
    y, x = np.mgrid[:h, :w]
    quarter = width // 4
    omega = 1.0 / temperature ** (np.arange(quarter) / quarter)
    xo = x.reshape(-1)[:, None] * omega[None]
    yo = y.reshape(-1)[:, None] * omega[None]
    pe = np.concatenate([np.sin(xo), np.cos(xo), np.sin(yo), np.cos(yo)], axis=1)
    return pe[None].astype(np.float32)


class MAPHead(nn.Module):
    """Multihead attention pooling: ``tokens [batch, L, D] -> [batch, D]``.

    A learned probe ``q [1, 1, D]`` (shared by all examples) attends over the tokens with
    ``num_heads`` heads, then a pre-LN MLP block adds its residual::

        p = MHA(q, x)               [batch, 1, D]   (queries from q, keys/values from x)
        y = p + MLP(LN(p))          MLP: D -> mlp_dim -> D, GELU
        return y[:, 0]

    Parameters follow big_vision's ``MAPHead`` (so its checkpoints load): ``probe [1, 1, D]``,
    ``MultiHeadDotProductAttention_0/{query,key,value}/kernel [D, heads, D/heads]`` (+ ``bias
    [heads, D/heads]``), ``.../out/kernel [heads, D/heads, D]`` (+ ``bias [D]``),
    ``LayerNorm_0/{scale,bias} [D]``, ``MlpBlock_0/Dense_0 [D, mlp_dim]``, ``MlpBlock_0/Dense_1
    [mlp_dim, D]``. The attention module is seqvis' :class:`MultiHeadAttention`, whose layout is
    that of ``flax.linen.MultiHeadDotProductAttention``; its weights ``[batch, heads, 1, L]`` are
    sown like the encoder's.
    """

    mlp_dim: int
    num_heads: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        b, _, d = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), self.param_dtype)
        q = jnp.broadcast_to(probe, (b, 1, d)).astype(x.dtype)
        p = MultiHeadAttention(num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                               name="MultiHeadDotProductAttention_0")(q, x)
        y = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="LayerNorm_0")(p)
        p = p + MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="MlpBlock_0")(y)
        return p[:, 0]


class ViT(nn.Module):
    """Vision Transformer: ``images [batch, H, W, C] -> logits [batch, num_classes]``.

    Attributes:
      num_classes: head size; None returns the pooled representation ``[batch, D]``.
      patch_size: p or (ph, pw); H and W must be divisible by it.
      width, depth, mlp_dim, num_heads: D, number of blocks, MLP hidden size (default 4D), heads.
      pool: 'token' (class token), 'gap' (global average pooling of the patch tokens) or 'map'
        (multihead attention pooling, :class:`MAPHead`, with ``num_heads`` heads and ``mlp_dim``).
      posemb: 'learned' or 'sincos2d'.
      representation_size: width of the optional pre-logits layer (None = no pre-logits).
      dropout_rate, attention_dropout_rate, stochastic_depth: regularisation.
      head_zero_init: zero-initialise the head kernel (the ViT fine-tuning convention).
      scan_layers, remat, use_fused_attention: compile/run-time switches, same numbers.
      hybrid_stages: ResNet (BiT, GroupNorm+WS) trunk block counts for an R+ViT hybrid.

    ``__call__(images, train=False, return_features=False)`` returns logits, or
    ``(logits, tokens [batch, tokens, D])`` with the encoder output when ``return_features``.
    """

    num_classes: int | None = 1000
    patch_size: int | tuple[int, int] = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int | None = None
    num_heads: int = 12
    pool: str = "token"
    posemb: str = "learned"
    representation_size: int | None = None
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    stochastic_depth: float = 0.0
    head_zero_init: bool = True
    head_bias_init: float = 0.0
    scan_layers: bool = False
    remat: bool = False
    use_fused_attention: bool = False
    hybrid_stages: tuple[int, ...] | None = None
    hybrid_width: int = 64
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    # ------------------------------------------------------------------ checks
    def check_config(self) -> None:
        """Raise a clear ValueError for settings that cannot work (no tracing needed)."""
        if self.width % self.num_heads:
            raise ValueError(
                f"ViT width={self.width} is not divisible by num_heads={self.num_heads}; "
                "set config.model.num_heads to a divisor of the width."
            )
        if self.pool not in POOLS:
            raise ValueError(f"ViT pool={self.pool!r} is unknown; use one of {POOLS}.")
        if self.posemb not in POSEMBS:
            raise ValueError(f"ViT posemb={self.posemb!r} is unknown; use one of {POSEMBS}.")
        if min(pair(self.patch_size)) < 1:
            raise ValueError(f"ViT patch_size={self.patch_size} must be positive.")

    def stride(self) -> tuple[int, int]:
        """Total downsampling from pixels to tokens (patch size × hybrid trunk stride)."""
        ph, pw = pair(self.patch_size)
        # ImageNet stem (stride 4), then every stage after the first halves the map.
        trunk = 4 * 2 ** (len(self.hybrid_stages) - 1) if self.hybrid_stages else 1
        return ph * trunk, pw * trunk

    def check_image_size(self, image_size: int | Sequence[int]) -> None:
        """Raise a clear ValueError if the image cannot be cut into whole patches."""
        h, w = pair(image_size)
        sh, sw = self.stride()
        if h % sh or w % sw:
            what = f"patch size {pair(self.patch_size)}" + (
                f" times the hybrid trunk stride {sh // pair(self.patch_size)[0]}" if self.hybrid_stages else "")
            raise ValueError(
                f"Image size {(h, w)} is not divisible by the {what}. Resize the images "
                f"(e.g. a 'resize({(h // sh) * sh or sh})' preprocessing op) or choose a patch size "
                f"that divides {h}x{w}."
            )

    def num_tokens(self, image_size: int | Sequence[int]) -> int:
        h, w = pair(image_size)
        sh, sw = self.stride()
        return (h // sh) * (w // sw) + (1 if self.pool == "token" else 0)

    # ------------------------------------------------------------------ model
    @nn.compact
    def __call__(self, images: Array, train: bool = False, return_features: bool = False):
        self.check_config()
        if images.ndim != 4:
            raise ValueError(f"ViT expects images [batch, H, W, C], got shape {images.shape}.")
        self.check_image_size(images.shape[1:3])
        x = images.astype(self.dtype) if self.dtype is not None else images

        if self.hybrid_stages:
            x = ResNetEncoder(stage_sizes=tuple(self.hybrid_stages), norm="group", stem="imagenet", padding="same",
                              width=self.hybrid_width, dtype=self.dtype,
                              param_dtype=self.param_dtype, name="ResNet")(x, train=train)

        ph, pw = pair(self.patch_size)
        x = nn.Conv(self.width, (ph, pw), strides=(ph, pw), padding="VALID", dtype=self.dtype,
                    param_dtype=self.param_dtype, name="embedding")(x)
        b, gh, gw, d = x.shape
        x = x.reshape(b, gh * gw, d)  # [batch, N, D], row-major patch order

        if self.posemb == "sincos2d":
            x = x + jnp.asarray(sincos_2d_posemb(gh, gw, d), x.dtype)
        if self.pool == "token":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, d), self.param_dtype)
            x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)

        x = Encoder(
            num_layers=self.depth,
            mlp_dim=self.mlp_dim or 4 * self.width,
            num_heads=self.num_heads,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            stochastic_depth=self.stochastic_depth,
            add_position_embedding=self.posemb == "learned",
            scan_layers=self.scan_layers,
            remat=self.remat,
            use_fused_attention=self.use_fused_attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="Transformer",
        )(x, deterministic=not train)
        tokens = x

        if self.pool == "token":
            y = x[:, 0]
        elif self.pool == "map":
            y = MAPHead(mlp_dim=self.mlp_dim or 4 * self.width, num_heads=self.num_heads, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="MAPHead_0")(x)
        else:
            y = jnp.mean(x, axis=1)
        if self.representation_size is not None:
            y = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                                 param_dtype=self.param_dtype, name="pre_logits")(y))
        if self.num_classes is not None:
            kinit = nn.initializers.zeros if self.head_zero_init else nn.initializers.lecun_normal()
            y = nn.Dense(self.num_classes, kernel_init=kinit,
                         bias_init=nn.initializers.constant(self.head_bias_init),
                         dtype=self.dtype, param_dtype=self.param_dtype, name="head")(y)
        y = y.astype(jnp.float32)
        return (y, tokens) if return_features else y


# ---------------------------------------------------------------------- variants

_NAME = re.compile(r"^(?:(?P<trunk>R\d+)\+)?(?P<variant>[A-Za-z]+)/(?P<patch>\d+)(?:x(?P<patch_w>\d+))?$")


def parse_name(name: str) -> dict[str, Any]:
    """``"B/16"`` -> ViT kwargs; ``"R50+B/16"`` -> hybrid kwargs (1x1 patches on the trunk)."""
    m = _NAME.match(name.strip())
    valid = ", ".join(VARIANTS)
    if not m:
        raise ValueError(
            f"Cannot parse ViT name {name!r}; write VARIANT/PATCH such as 'B/16' or 'Ti/4' "
            f"(variants: {valid}), or a hybrid such as 'R50+B/16' (trunks: {', '.join(HYBRID_TRUNKS)})."
        )
    v = m.group("variant")
    if v not in VARIANTS:
        raise ValueError(f"Unknown ViT variant {v!r} in {name!r}; valid variants: {valid}.")
    kw = dataclasses.asdict(VARIANTS[v])
    ph = int(m.group("patch"))
    pw = int(m.group("patch_w") or ph)
    if m.group("trunk"):
        trunk = m.group("trunk")
        if trunk not in HYBRID_TRUNKS:
            raise ValueError(f"Unknown hybrid trunk {trunk!r}; valid: {', '.join(HYBRID_TRUNKS)}.")
        strides = HYBRID_TRUNKS[trunk]
        if ph != pw or ph not in strides:
            raise ValueError(f"Hybrid {name!r}: the {trunk} trunk comes with stride "
                             f"{' or '.join(map(str, strides))}, so write e.g. {trunk}+{v}/{min(strides)}.")
        kw.update(hybrid_stages=strides[ph], patch_size=(1, 1))
    else:
        kw["patch_size"] = (ph, pw)
    return kw


def build(name: str, num_classes: int | None = 1000, image_size: int | Sequence[int] | None = None,
          **overrides: Any) -> ViT:
    """Build a named variant, e.g. ``build("B/16", num_classes=1000)``.

    Extra keyword arguments override fields of :class:`ViT` (``depth=6``, ``pool='gap'``...).
    If ``image_size`` is given, it is checked against the patch size right away.
    """
    kw = parse_name(name)
    fields = {f.name for f in dataclasses.fields(ViT)} - {"parent", "name"}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"Unknown ViT field(s) {sorted(unknown)}; valid fields: {sorted(fields)}.")
    kw.update(overrides)
    if "patch_size" in kw:
        kw["patch_size"] = pair(kw["patch_size"])
    model = ViT(num_classes=num_classes, **kw)
    model.check_config()
    if image_size is not None:
        model.check_image_size(image_size)
    return model


# ---------------------------------------------------------------------- fine-tuning


def _linear_zoom_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` linear interpolation weights with the corners aligned.

    Output sample o sits at input coordinate ``o·(n_in − 1)/(n_out − 1)`` (0 if n_out = 1),
    the coordinates ``scipy.ndimage.zoom(..., order=1)`` uses, and mixes its two neighbours.
    """
    m = np.zeros((n_out, n_in))
    pos = np.arange(n_out) * ((n_in - 1) / (n_out - 1)) if n_out > 1 else np.zeros(1)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = pos - lo
    np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(m, (np.arange(n_out), hi), frac)
    return m


def resample_posemb(posemb: Array, new_grid: int | Sequence[int], num_prefix_tokens: int | None = None) -> Array:
    """Resize learned position embeddings to a new patch grid (fine-tuning at another resolution).

    Args:
      posemb: ``[1, P + g*g, D]`` with P prefix (class) tokens in front of a square grid.
      new_grid: the new (gh', gw') grid (or one int for square).
      num_prefix_tokens: P; inferred if None (0 if the length is a perfect square, else 1).
    Returns:
      ``[1, P + gh'*gw', D]``: the prefix embeddings unchanged, the grid part zoomed linearly
      with aligned corners, as the official ViT code does (``scipy.ndimage.zoom(grid, zoom,
      order=1)``), so published checkpoints fine-tune as they were meant to. Computed on the
      host in float64 and returned in the input dtype.
    """
    posemb = np.asarray(posemb)
    n = posemb.shape[1]
    if num_prefix_tokens is None:
        num_prefix_tokens = 0 if math.isqrt(n) ** 2 == n else 1
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    g = math.isqrt(grid.shape[1])
    if g * g != grid.shape[1]:
        raise ValueError(
            f"posemb has {grid.shape[1]} grid tokens after {num_prefix_tokens} prefix tokens, "
            "which is not a square grid; pass num_prefix_tokens explicitly."
        )
    gh, gw = pair(new_grid)
    d = grid.shape[-1]
    zy, zx = _linear_zoom_matrix(g, gh), _linear_zoom_matrix(g, gw)
    resized = np.einsum("yi,xj,ijd->yxd", zy, zx, grid.reshape(g, g, d).astype(np.float64))
    resized = resized.reshape(1, gh * gw, d).astype(posemb.dtype)
    return jnp.asarray(np.concatenate([prefix, resized], axis=1))
