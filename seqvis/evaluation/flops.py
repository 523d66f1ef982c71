"""FLOP counting: XLA's cost analysis of a compiled forward pass (loops counted in full), and an
analytic count for ViT.

Convention: one multiply-add is 2 FLOPs, and the training compute of a run is
``3 × forward FLOPs per example × examples seen`` (the backward pass costs about twice
the forward; the convention of the ViT and Scaling-ViT papers). Tables that quote
"GFLOPs" for ViT-B/16 as 17.6 count multiply-adds; this module gives 35.1.

The analytic ViT count includes every matrix product (patch embedding, Q/K/V and output
projections, the two attention products, the MLP, pre-logits and head) and nothing else;
layer norms, GELU, softmax, residual adds and biases add a few percent for tiny widths and
well under 1% at ViT-Ti scale (``tests/test_scaling.py`` checks it against XLA).
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import jax.extend.core  # noqa: F401 - jax.extend.core.ClosedJaxpr / jaxpr_as_fun

from seqvis.utils import pair

log = logging.getLogger(__name__)

TRAIN_FLOPS_PER_FORWARD = 3.0  # forward + backward (2x forward)


def _cost_flops(compiled) -> float | None:
    """The FLOPs in a compiled program's cost analysis (None where the backend has none)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def _xla_flops(fn, *args) -> float | None:
    """FLOPs XLA's cost analysis gives the compiled ``fn(*args)`` (None where the backend has none)."""
    return _cost_flops(jax.jit(fn).lower(*args).compile())


def _sub_jaxprs(eqn):
    for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(sub, jax.extend.core.ClosedJaxpr):
                yield sub
            elif isinstance(sub, jax.extend.core.Jaxpr):
                yield jax.extend.core.ClosedJaxpr(sub, ())


def _loop_flops_missed(jaxpr) -> float | None:
    """FLOPs XLA's cost analysis leaves out of a program: it counts a loop's body once.

    For every ``scan`` (``nn.scan`` over layers or time steps) the body is compiled on its own
    and counted ``length - unroll`` more times (an ``unroll`` of k puts k iterations in the
    compiled body); nested loops are corrected the same way. None for a ``while`` loop, whose
    trip count the program does not state.
    """
    missed = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "while":
            return None
        for sub in _sub_jaxprs(eqn):
            inner = _loop_flops_missed(sub.jaxpr)
            if inner is None:
                return None
            if name != "scan":
                missed += inner
                continue
            length, unroll = int(eqn.params["length"]), eqn.params.get("unroll", 1)
            counted = length if unroll is True else min(max(int(unroll), 1), length)
            body = _xla_flops(jax.extend.core.jaxpr_as_fun(sub), *(v.aval for v in sub.jaxpr.invars))
            if body is None:
                return None
            missed += (length - counted) * (body + inner) + counted * inner
    return missed


def compiled_flops(compiled, fn, *args) -> float | None:
    """FLOPs of one call of ``fn(*args)`` already compiled as ``compiled = fn.lower(*args).compile()``
    (``fn`` a jit or pmap): XLA's count plus the loop iterations it leaves out (see
    :func:`_loop_flops_missed`). None where the backend has no cost analysis or a loop's length is unknown."""
    total = _cost_flops(compiled)
    if total is None:
        return None
    missed = _loop_flops_missed(jax.make_jaxpr(fn)(*args).jaxpr)
    return None if missed is None else total + missed


def forward_flops_per_example(model: Any, variables: dict, inputs: Sequence[Any]) -> float | None:
    """Forward-pass FLOPs per example from XLA's cost analysis of the compiled eval forward.

    ``model.apply(variables, *inputs, train=False)`` is compiled (``inputs`` as a task's
    ``model_inputs(batch)`` gives them, batch dimension first); the count is the compiled
    program's total divided by the batch size. XLA counts the body of a loop once, so the
    iterations of scanned layers or time steps it leaves out are added (see
    :func:`_loop_flops_missed`). Returns None where the backend offers no cost analysis or
    the program has a loop of unknown length.
    """
    inputs = tuple(inputs)

    def forward(v, *xs):
        return model.apply(v, *xs, train=False)

    try:
        total = _xla_flops(forward, variables, *inputs)
        missed = _loop_flops_missed(jax.make_jaxpr(forward)(variables, *inputs).jaxpr) if total is not None else None
    except Exception as e:  # noqa: BLE001 - cost analysis is best effort on some backends
        log.warning("XLA cost analysis failed: %s", e)
        return None
    if total is None or missed is None:
        return None
    return (total + missed) / inputs[0].shape[0]


def vit_flops_breakdown(*, image_shape: Sequence[int], patch_size: int | Sequence[int], width: int, depth: int,
                        mlp_dim: int | None = None, num_classes: int | None = 1000, pool: str = "token",
                        representation_size: int | None = None) -> dict[str, float]:
    """Analytic forward FLOPs per example of a ViT, by part (2 FLOPs per multiply-add).

    With N patches of p_h×p_w×C pixels, T = N (+1 class token) tokens, width D, MLP width M:

      embedding   2 · N · (p_h p_w C) · D
      per block   2·T·D·3D (q, k, v) + 2·T·T·D (q kᵀ) + 2·T·T·D (A v) + 2·T·D·D (out)
                  + 2·T·D·M · 2 (MLP)
      head        2·D·R (pre-logits) + 2·(R or D)·K
                  + for pool='map' (one probe query over the N tokens): 2·D·D (q) + 2·N·D·2D (k, v)
                    + 2·N·D · 2 (q kᵀ, A v) + 2·D·D (out) + 2·D·M · 2 (its MLP)
    """
    h, w, c = (int(x) for x in image_shape)
    ph, pw = pair(patch_size)
    if h % ph or w % pw:
        raise ValueError(f"patch size {(ph, pw)} does not divide the image {(h, w)}.")
    n = (h // ph) * (w // pw)
    t = n + (1 if pool == "token" else 0)
    d, m = int(width), int(mlp_dim or 4 * width)
    block = 2 * t * d * 3 * d + 2 * t * t * d * 2 + 2 * t * d * d + 2 * t * d * m * 2
    head_in = d
    head = 0.0
    if pool == "map":
        head += 2 * d * d + 2 * n * d * 2 * d + 2 * n * d * 2 + 2 * d * d + 2 * d * m * 2
    if representation_size:
        head += 2 * d * representation_size
        head_in = representation_size
    if num_classes:
        head += 2 * head_in * num_classes
    out = {"embedding": float(2 * n * ph * pw * c * d), "encoder": float(depth * block), "head": float(head)}
    out["total"] = sum(out.values())
    return out


def vit_forward_flops(model: Any, image_shape: Sequence[int]) -> float | None:
    """Analytic forward FLOPs per example for a :class:`seqvis.models.vit.ViT` module (None for hybrids)."""
    if getattr(model, "hybrid_stages", None):
        return None  # the ResNet trunk is not counted analytically; use XLA's count
    return vit_flops_breakdown(
        image_shape=image_shape, patch_size=model.patch_size, width=model.width, depth=model.depth,
        mlp_dim=model.mlp_dim, num_classes=model.num_classes, pool=model.pool,
        representation_size=model.representation_size)["total"]


def training_flops(forward_flops_per_example: float | None, examples_seen: float) -> float | None:
    """Training compute ``3 × forward FLOPs per example × examples seen`` (None if unknown)."""
    if forward_flops_per_example is None:
        return None
    return TRAIN_FLOPS_PER_FORWARD * float(forward_flops_per_example) * float(examples_seen)
