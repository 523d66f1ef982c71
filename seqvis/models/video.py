"""Video classification: one frame encoder shared by all frames, then a temporal model.

For a clip ``x [B, T, H, W, C]`` whose first ``L_b`` frames are real (``lengths [B]``; the
rest is padding)::

    f_t = E(x_t)                       [B, T, D]   the same weights for every frame t
    z   = Temporal(f_1 .. f_T; L)      [B, D']     padded frames t >= L never reach z
    y   = W z + b                      [B, K]      logits

The frame encoder folds time into the batch (``[B·T, H, W, C]``), runs one backbone — a
small CNN, a :class:`~seqvis.models.resnet.ResNetEncoder` (GroupNorm) or a
:class:`~seqvis.models.vit.ViT` — and projects each frame to D with ``LN(Dense(·))``.
Its parameters do not depend on T.

Temporal models (``temporal``), with m_t = [t < L] the mask of real frames:

- ``mean``: ``z = GELU(W · Σ_t m_t f_t / L)``: the single-frame baseline. It sees the clip as
  a set of frames, so it is invariant to their order.
- ``lstm`` / ``gru``: LRCN (Donahue et al. 2015): a stack of scanned cells from
  :mod:`seqvis.models.recurrent` with per-example lengths; ``z = h_{L-1}`` of the last
  layer (bidirectional: ``[h→_{L-1}; h←_0]``).
- ``transformer``: the temporal half of ViViT's factorised encoder (Arnab et al. 2021):
  ``[cls; f_1 W; ..; f_T W] + E_pos`` (a learned temporal position embedding of
  ``max_frames + 1`` positions) through a pre-LN :class:`~seqvis.models.transformer.Encoder`
  whose attention never looks at padded frames; ``z`` = the class token's output.
- ``tconv``: temporal 1-D convolutions, ``g^0 = f W``,
  ``g^l = ReLU(conv1d_k(m ⊙ g^{l-1}))`` with zero ('SAME') padding, then the masked mean
  ``z = Σ_t m_t g^n_t / L``. Zeroing padded frames before every convolution makes the
  result exactly that of the clip cut to its L real frames.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from seqvis.models import vit
from seqvis.models.attention import make_padding_mask
from seqvis.models.common import lengths_to_valid
from seqvis.models.recurrent import StackedRNN
from seqvis.models.resnet import ResNetEncoder
from seqvis.models.transformer import Encoder

Array = jax.Array
Dtype = Any

TEMPORAL_MODELS = ("mean", "lstm", "gru", "transformer", "tconv")
BACKBONES = ("cnn", "resnet", "vit")
POOLS = ("flatten", "gap")


def masked_mean(x: Array, valid: Array) -> Array:
    """Mean of ``x [B, T, D]`` over the real frames (``valid [B, T]``) -> ``[B, D]``; 0 if none."""
    m = valid.astype(x.dtype)[..., None]
    return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


# ---------------------------------------------------------------------------- frame encoder


class FrameCNN(nn.Module):
    """Plain CNN for small frames: ``[N, H, W, C] -> [N, H/2^n, W/2^n, channels[-1]]``.

    ``n = len(channels)`` stages, each ``ReLU(conv3x3_stride2(x) + b)`` (sizes round up).

    Attributes:
      channels: output channels of each stage.
    """

    channels: Sequence[int] = (32, 64, 128)
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        del train
        for i, c in enumerate(self.channels):
            x = nn.relu(nn.Conv(int(c), (3, 3), strides=(2, 2), padding="SAME", dtype=self.dtype,
                                param_dtype=self.param_dtype, name=f"conv_{i}")(x))
        return x


def check_frame_encoder(backbone: str, pool: str, backbone_kwargs: Mapping[str, Any] | None) -> None:
    """Raise a clear ValueError for a frame encoder setting that cannot work."""
    if backbone not in BACKBONES:
        raise ValueError(f"config.model.backbone={backbone!r} is unknown; use one of {BACKBONES}.")
    if pool not in POOLS:
        raise ValueError(f"config.model.pool={pool!r} is unknown; use one of {POOLS}.")
    if backbone == "resnet" and dict(backbone_kwargs or {}).get("norm", "group") != "group":
        raise ValueError(
            "config.model.backbone_kwargs.norm='batch' is not supported for video: batch statistics "
            "would mix padded frames into real ones; use norm='group'.")


class FrameEncoder(nn.Module):
    """Each frame on its own, one set of weights: ``video [B, T, H, W, C] -> [B, T, embed_dim]``.

    ``e_t = LN(W · pool(backbone(x_t)) + b)``. Frames are folded into the batch, so the
    parameters are those of one frame encoder whatever T is.

    Attributes:
      backbone: 'cnn' (:class:`FrameCNN`), 'resnet' (:class:`ResNetEncoder`, GroupNorm: no
        statistics across frames or clips, so padded frames cannot leak) or 'vit'
        (:class:`ViT` pooled output; ``variant`` such as 'Ti/4' or explicit sizes).
      backbone_kwargs: constructor arguments of the backbone.
      pool: for feature-map backbones: 'flatten' (keeps where things are: motion needs it)
        or 'gap' (global average pooling, fine for appearance-driven datasets).
      embed_dim: D.
    """

    backbone: str = "cnn"
    backbone_kwargs: Mapping[str, Any] | None = None
    pool: str = "flatten"
    embed_dim: int = 128
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def check_config(self) -> None:
        check_frame_encoder(self.backbone, self.pool, self.backbone_kwargs)

    def make_backbone(self) -> nn.Module:
        kw = dict(self.backbone_kwargs or {})
        if self.backbone == "cnn":
            return FrameCNN(dtype=self.dtype, param_dtype=self.param_dtype, name="backbone", **kw)
        if self.backbone == "resnet":
            kw.setdefault("norm", "group")
            return ResNetEncoder(dtype=self.dtype, param_dtype=self.param_dtype, name="backbone", **kw)
        variant = kw.pop("variant", None)
        if variant is not None:  # a named variant such as 'Ti/4'; other kwargs override its fields
            kw = {**vit.parse_name(variant), **kw}
        return vit.ViT(num_classes=None, dtype=self.dtype, param_dtype=self.param_dtype, name="backbone", **kw)

    @nn.compact
    def __call__(self, video: Array, train: bool = False) -> Array:
        self.check_config()
        b, t = video.shape[:2]
        frames = video.reshape((b * t,) + video.shape[2:])
        x = self.make_backbone()(frames, train=train)
        if x.ndim == 4:
            x = x.reshape(x.shape[0], -1) if self.pool == "flatten" else jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="embedding")(x)
        x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
        return x.reshape(b, t, self.embed_dim)


# ---------------------------------------------------------------------------- temporal models


class MeanPool(nn.Module):
    """Order-invariant baseline: ``[B, T, D], valid [B, T] -> GELU(W mean_{real t} f_t) [B, width]``."""

    width: int
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, f: Array, valid: Array, *, deterministic: bool = True) -> Array:
        del deterministic
        z = masked_mean(f, valid)
        return nn.gelu(nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="mlp")(z))


class RecurrentPool(nn.Module):
    """LRCN head: stacked scanned cells, ``[B, T, D] -> h_{L-1} [B, width]`` (``[B, 2·width]`` bidirectional).

    Padded steps leave the state unchanged (see :class:`~seqvis.models.recurrent.Recurrent`).
    ``dtype`` is the cells' matmul dtype; their state (carry) stays in ``param_dtype``.
    """

    cell: str = "lstm"
    width: int = 128
    num_layers: int = 1
    bidirectional: bool = False
    dropout_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, f: Array, lengths: Array, *, deterministic: bool = True) -> Array:
        out, _ = StackedRNN(features=self.width, num_layers=self.num_layers, cell=self.cell,
                            cell_kwargs={"dtype": self.dtype, "param_dtype": self.param_dtype},
                            bidirectional=self.bidirectional, dropout_rate=self.dropout_rate,
                            name="rnn")(f, lengths, deterministic=deterministic)
        last = jnp.clip(jnp.asarray(lengths) - 1, 0, f.shape[1] - 1)
        fwd = jnp.take_along_axis(out[..., :self.width], last[:, None, None], axis=1)[:, 0]
        if not self.bidirectional:
            return fwd
        return jnp.concatenate([fwd, out[:, 0, self.width:]], axis=-1)  # backward pass ends at t = 0


class TransformerPool(nn.Module):
    """Temporal transformer with a class token: ``[B, T, D], valid [B, T] -> [B, width]``.

    ``z_0 = [cls; f W] + E_pos[:T+1]``; attention keys are the class token and the real
    frames only; the output is the class token after the encoder (its final LayerNorm).

    Attributes:
      width, num_layers, num_heads, mlp_dim: encoder sizes (mlp_dim defaults to 4·width).
      max_frames: positions of the temporal embedding (clips may be shorter, not longer).
      dropout_rate: dropout in the encoder blocks.
    """

    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int | None = None
    max_frames: int = 16
    dropout_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, f: Array, valid: Array, *, deterministic: bool = True) -> Array:
        b, t, _ = f.shape
        if t > self.max_frames:
            raise ValueError(f"Clips of {t} frames are longer than config.model.max_frames={self.max_frames}; "
                             f"set config.model.max_frames >= {t}.")
        x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="embedding")(f)
        cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype), x], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                         (1, self.max_frames + 1, self.width), self.param_dtype)
        x = x + pos[:, :t + 1].astype(x.dtype)
        keys = jnp.concatenate([jnp.ones((b, 1), bool), valid], axis=1)
        x = Encoder(num_layers=self.num_layers, mlp_dim=self.mlp_dim or 4 * self.width, num_heads=self.num_heads,
                    dropout_rate=self.dropout_rate, dtype=self.dtype, param_dtype=self.param_dtype,
                    name="Transformer")(x, make_padding_mask(keys), deterministic=deterministic)
        return x[:, 0]


class TemporalConvPool(nn.Module):
    """Temporal CNN: ``[B, T, D], valid [B, T] -> [B, width]``.

    ``g^0 = f W``; ``g^l = ReLU(conv1d_k(m ⊙ g^{l-1}))`` (SAME zero padding), l = 1..num_layers;
    ``z = masked mean of g^n``. Equal to running on the clip cut to its real frames.
    """

    width: int = 128
    num_layers: int = 2
    kernel_size: int = 3
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, f: Array, valid: Array, *, deterministic: bool = True) -> Array:
        del deterministic
        m = valid.astype(f.dtype)[..., None]
        x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype, name="embedding")(f)
        for i in range(self.num_layers):
            x = nn.relu(nn.Conv(self.width, (self.kernel_size,), padding="SAME", dtype=self.dtype,
                                param_dtype=self.param_dtype, name=f"conv_{i}")(x * m))
        return masked_mean(x, valid)


# ---------------------------------------------------------------------------- classifier


class VideoClassifier(nn.Module):
    """``video [B, T, H, W, C], lengths [B] -> logits [B, num_classes]`` (float32).

    Attributes:
      num_classes: K.
      temporal: 'mean', 'lstm', 'gru', 'transformer' or 'tconv' (module docstring).
      backbone, backbone_kwargs, pool, embed_dim: the frame encoder (:class:`FrameEncoder`).
      width: size of the temporal model (RNN hidden size, transformer width, conv channels,
        MLP width of 'mean').
      num_layers: RNN layers, transformer blocks or temporal convolutions.
      num_heads, mlp_dim, max_frames: transformer only.
      kernel_size: tconv only.
      bidirectional: lstm / gru only.
      dropout_rate: before the head (and inside the transformer / between RNN layers).

    ``__call__(video, lengths=None, train=False, return_features=False)``; ``lengths=None``
    means every frame is real. ``return_features`` also returns the frame embeddings
    ``[B, T, D]`` and the clip representation ``z``.
    """

    num_classes: int
    temporal: str = "lstm"
    backbone: str = "cnn"
    backbone_kwargs: Mapping[str, Any] | None = None
    pool: str = "flatten"
    embed_dim: int = 128
    width: int = 128
    num_layers: int = 1
    num_heads: int = 4
    mlp_dim: int | None = None
    max_frames: int = 16
    kernel_size: int = 3
    bidirectional: bool = False
    dropout_rate: float = 0.0
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

    def check_config(self) -> None:
        """Raise a clear ValueError for settings that cannot work (no tracing needed)."""
        if self.temporal not in TEMPORAL_MODELS:
            raise ValueError(f"config.model.temporal={self.temporal!r} is unknown; use one of {TEMPORAL_MODELS}.")
        for field in ("embed_dim", "width", "num_layers", "max_frames", "kernel_size", "num_heads"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"config.model.{field}={getattr(self, field)} must be >= 1.")
        if self.temporal == "transformer" and self.width % self.num_heads:
            raise ValueError(f"config.model.width={self.width} is not divisible by config.model.num_heads="
                             f"{self.num_heads}; set num_heads to a divisor of the width.")
        if self.bidirectional and self.temporal not in ("lstm", "gru"):
            raise ValueError(f"config.model.bidirectional=True needs temporal='lstm' or 'gru', "
                             f"not {self.temporal!r}.")
        check_frame_encoder(self.backbone, self.pool, self.backbone_kwargs)

    @nn.compact
    def __call__(self, video: Array, lengths: Array | None = None, train: bool = False,
                 return_features: bool = False):
        self.check_config()
        if video.ndim != 5:
            raise ValueError(f"VideoClassifier expects video [batch, frames, H, W, C], got shape {video.shape}.")
        b, t = video.shape[:2]
        if lengths is None:
            lengths = jnp.full((b,), t, jnp.int32)
        elif lengths.shape != (b,):
            raise ValueError(f"lengths must have shape [batch]=({b},), got {lengths.shape}.")
        valid = lengths_to_valid(lengths, t)  # [B, T], True for real frames t < length
        det = not train

        f = FrameEncoder(backbone=self.backbone, backbone_kwargs=self.backbone_kwargs, pool=self.pool,
                         embed_dim=self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="frame_encoder")(video, train=train)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.temporal == "mean":
            z = MeanPool(self.width, **kw, name="temporal")(f, valid, deterministic=det)
        elif self.temporal in ("lstm", "gru"):
            z = RecurrentPool(cell=self.temporal, width=self.width, num_layers=self.num_layers,
                              bidirectional=self.bidirectional, dropout_rate=self.dropout_rate,
                              **kw, name="temporal")(f, lengths, deterministic=det)
        elif self.temporal == "transformer":
            z = TransformerPool(width=self.width, num_layers=self.num_layers, num_heads=self.num_heads,
                                mlp_dim=self.mlp_dim, max_frames=self.max_frames, dropout_rate=self.dropout_rate,
                                **kw, name="temporal")(f, valid, deterministic=det)
        else:
            z = TemporalConvPool(width=self.width, num_layers=self.num_layers, kernel_size=self.kernel_size,
                                 **kw, name="temporal")(f, valid, deterministic=det)
        z = nn.Dropout(self.dropout_rate)(z, deterministic=det)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype, name="head")(z)
        logits = logits.astype(jnp.float32)
        return (logits, f, z) if return_features else logits
