"""A sweep's points made concrete: each point's config (base + overrides), checked by the
trainer's own checks, and described (model family and sizes, parameters, analytic FLOPs)
without training anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import jax

from experiments.sweep.spec import (FAMILY_SECTIONS, SweepError, apply_overrides, flatten, load_config, point_id,
                                    point_label)
from seqvis.evaluation.flops import vit_forward_flops
from seqvis.models.common import num_params
from seqvis.tasks.base import get_task
from seqvis.trainer import check_config


@dataclasses.dataclass
class Point:
    index: int
    id: str
    label: str
    overrides: dict
    config_spec: str
    config: Any  # ml_collections.ConfigDict
    info: dict  # model description, params, analytic FLOPs (from describe())

    @property
    def dirname(self) -> str:
        return f"{self.label}-{self.id}"


def describe(config) -> dict:
    """Model family and sizes, parameter count and analytic forward FLOPs, without training.

    Builds the task's model (which checks the model fields), checks the patch size against
    the image size, and counts parameters with ``jax.eval_shape`` (no memory, no compile).
    """
    task = get_task(config)
    model = task.model
    family = config.model.get("name", "vit")
    shape = tuple(config.data.image_shape)
    info: dict[str, Any] = {"family": family}
    if family == "vit":
        model.check_image_size(shape[:2])
        ph, pw = model.patch_size if isinstance(model.patch_size, tuple) else (model.patch_size,) * 2
        info.update(width=model.width, depth=model.depth, mlp_dim=model.mlp_dim or 4 * model.width,
                    heads=model.num_heads, patch=ph if ph == pw else f"{ph}x{pw}")
        flops = vit_forward_flops(model, shape)
        info["analytic_gflops_per_example"] = None if flops is None else flops / 1e9
        info["model"] = f"ViT w{model.width} d{model.depth} p{info['patch']}"
    elif family == "resnet":
        info.update(width=model.width, depth=model.depth, mlp_dim=None, heads=None, patch=None,
                    analytic_gflops_per_example=None, model=f"ResNet-{model.depth} w{model.width}")
    else:
        info.update(width=None, depth=None, mlp_dim=None, heads=None, patch=None, analytic_gflops_per_example=None,
                    model=family)
    key = json.dumps([config.get("task"), config.model.to_dict(), config.data.get("num_classes"), list(shape)],
                     sort_keys=True, default=str)
    if key not in _PARAMS:  # tracing init is most of a point's description (ViT-G: ~3 s); budgets share models
        dummy = task.dummy_batch(1)
        variables = jax.eval_shape(lambda: task.init(jax.random.PRNGKey(0), dummy))
        _PARAMS[key] = num_params(variables["params"])
    info["params"] = _PARAMS[key]
    return info


_PARAMS: dict[str, int] = {}  # parameter counts by (task, model fields, classes, image shape)


def expand(base_spec: str, base_config, points: list[dict], where: str,
           shared: dict[str, Any] | None = None) -> list[Point]:
    """Apply every point's overrides and check it (model fields, patch vs image, trainer checks).

    ``shared`` (the command line's ``--config.*`` overrides) is applied to the base config of
    points that bring their own ``config``, except under :data:`FAMILY_SECTIONS`.
    """
    out = []
    other_bases: dict[str, Any] = {}
    for i, ov in enumerate(points):
        spec = ov.get("config", base_spec)
        if "config" in ov:
            if spec not in other_bases:
                other = load_config(spec, flag=f"{where}: point {i} 'config'")
                keep = {k: v for k, v in (shared or {}).items()
                        if not k.startswith(FAMILY_SECTIONS) and k in flatten(other)}
                other_bases[spec] = apply_overrides(other, keep, f"--config overrides for {spec}")
            base = other_bases[spec]
        else:
            base = base_config
        pw = f"{where}: point {i} ({point_label(ov, 200)})"
        config = apply_overrides(base, ov, pw)
        try:
            check_config(config)
            info = describe(config)
        except (ValueError, TypeError, KeyError) as e:
            raise SweepError(f"{pw}: {type(e).__name__}: {e}") from e
        out.append(Point(index=i, id=point_id(ov), label=point_label(ov), overrides=ov, config_spec=spec,
                         config=config, info=info))
    return out


def total_steps(p: Point) -> int | None:
    """Training steps of a point, as the trainer computes them (None if the dataset size is unknown)."""
    c = p.config
    if c.get("total_steps"):
        return int(c.total_steps)
    n_train = p.info.get("num_train_examples")
    if not n_train or not c.get("num_epochs"):
        return None
    return int(math.ceil(float(c.num_epochs) * n_train / int(c.batch_size)))
