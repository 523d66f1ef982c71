"""Named evaluators: what a run measures while it trains and at the end (``config.evals``).

``config.evals`` maps a name to an evaluator (big_vision's ``config.evals``)::

    config.evals.minival = evaluator("classification", split="train[99%:]")
    config.evals.v2 = evaluator("classification", dataset="imagenet_v2", split="test")
    config.evals.fewshot_mnist = evaluator("fewshot", dataset="mnist", shots=(1, 5, 10, 25))

(:func:`seqvis.train.defaults.evaluator` fills in every field of the type at its default, from
``defaults.EVAL_FIELDS``; a plain dict with some of the fields works as well.) Fields of every
evaluator:

- ``type``: ``classification`` or ``fewshot``.
- ``dataset``: a name: a preset of :mod:`seqvis.data.presets` (``mnist``, ``cifar10``, ...) or a
  tfds name (``imagenet_v2``, read with ``config.data.pp_eval``), from ``config.data.data_dir``; or
  a data config (fields as ``config.data``: ``name``, ``data_dir``, ``idx_dir``, ``pp_eval``, ...,
  over those of its ``preset`` if it names one: ``{'preset': 'mnist', 'idx_dir': DIR}``). Default:
  ``config.data``.
- ``pp``: the preprocessing (default: the dataset's ``pp_eval``); the images must fit the model.
- ``every_steps``: evaluate every that many steps (0: only at the end; default
  ``config.eval_every_steps``). Every evaluator also runs after the last step.
- ``batch_size``: global batch (default ``config.eval_batch_size``).

``classification``: the task's own eval step (the loss and metrics of ``task.losses``, masked
means over every example of ``split`` once), as the run's ``eval_split`` evaluation always was.
``split`` defaults to the dataset's ``eval_split``. With ``label_key`` other than ``label`` the
labels are the multi-hot vector ``[num_classes]`` the pp puts under that key (ImageNet ReaL:
``onehot(1000, key="real_label", key_result="real_labels")``): an example counts as correct when
its top-1 class is one of its labels, and examples without a label are left out (the ReaL
protocol); it reports ``accuracy`` and ``num_examples``. Keys: ``<name>/<metric>``.

``fewshot``: few-shot linear transfer of frozen features (:mod:`seqvis.evaluation.fewshot`): for
each seed (``seeds``: 0 .. seeds-1) and each ``k`` in ``shots``, a class-balanced k-shot set of
``train_split`` (default the dataset's ``train_split``), a closed-form regularised least-squares
probe (``l2_reg``) on its features, scored on ``split`` (default ``eval_split``). Features are the
``representation``: ``pre_logits`` (default: the input of the model's ``head`` module — ViT's
pooled representation after its optional pre-logits layer, ResNet's pooled features) or the
output of the module at that path (e.g. ``Transformer/encoder_norm``; averaged over all axes
between batch and feature axes). Per evaluation the features of the test split and of the
examples of the k-shot sets (never the whole pool) are extracted once, with the compiled model
on all devices. The labels are the dataset's ``label`` feature (``num_classes`` classes; default
from the dataset info). Keys: ``fewshot/<key>/<k>shot`` (mean over seeds), ``key`` defaulting to
the dataset's preset or tfds name; results.json also has ``fewshot/<key>/<k>shot_per_seed``.

Default: when ``config.evals`` has no classification evaluator (empty, or only few-shot
evaluators), the run keeps its own evaluation: ``classification`` on ``config.data``'s
``eval_split`` every ``config.eval_every_steps``, written as ``eval/<metric>``. Its final
values are the run's headline numbers: results.json has them unprefixed (``accuracy``,
``loss``, ``num_examples``), as before evaluators existed. A configured classification evaluator
takes that place with ``main=True`` (at most one); every other evaluator's final values go
into results.json under their keys.

On the command line, ``ml_collections`` overrides can change the fields an entry has
(``--config.evals.val.every_steps=1000``; entries made with ``evaluator()`` have them all) but
cannot add an entry to ``config.evals``. Either use a config argument that adds evaluators
(``configs/vit.py:fewshot``) and override their fields, or give the whole dict, which replaces
the config's (unset fields take their defaults)::

    --config=configs/vit.py:fewshot --config.evals.fewshot_fashion_mnist.shots='(1, 10)'
    --config.evals="{'fs': {'type': 'fewshot', 'dataset': 'fashion_mnist', 'shots': (1, 10)}}"

Every check that needs no data runs in :func:`check_config` (from the trainer's config check);
:func:`from_config` then opens the datasets (unknown or unprepared datasets and splits that do
not exist are a :class:`DataError`), draws the k-shot sets and traces the feature extraction
(an unknown representation is a :class:`ConfigError`), all before anything is compiled.
"""

from __future__ import annotations

import copy
import logging
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from seqvis.data import pipeline, presets
from seqvis.data import sources
from seqvis.errors import ConfigError, DataError
from seqvis.evaluation import fewshot as fewshot_lib
from seqvis.train import defaults

log = logging.getLogger(__name__)

#: The fields of each evaluator type and their defaults (None: unset, from the dataset or the config; see above).
FIELDS: dict[str, dict[str, Any]] = {kind: {k: None if isinstance(v, type) or v == "" else v for k, v in fields.items()}
                                     for kind, fields in defaults.EVAL_FIELDS.items()}
DEFAULT_NAME = "eval"  # the run's own evaluation, when config.evals has no classification evaluator
PRE_LOGITS = "pre_logits"


# ============================================================================ config (no data read)


def imagenet1k_evals(pp_eval: str) -> ml_collections.ConfigDict:
    """The evaluation sets of the ImageNet-1k recipes, as ``config.evals``.

    ``minival``: the last 1% of imagenet2012 ``train`` (12,812 images), which the preset's training split
    ``train[:99%]`` leaves out; ``val``: the validation set (the run's headline numbers in results.json);
    ``v2``: ImageNet-v2 (tfds ``imagenet_v2``, its ``test`` split: 10,000 images of the same 1000 classes);
    ``real``: the ReaL labels of the validation set (tfds ``imagenet2012_real``: top-1 counts as correct when
    it is one of the image's ReaL labels; images without any are left out). The first two read
    ``config.data``; the others its ``data_dir``, with ``pp_eval`` (``real`` adds the multi-hot of ``real_label``).
    """
    return ml_collections.ConfigDict(dict(
        minival=defaults.evaluator("classification", split="train[99%:]"),
        val=defaults.evaluator("classification", split="validation", main=True),
        v2=defaults.evaluator("classification", dataset="imagenet_v2", split="test"),
        real=defaults.evaluator("classification", dataset="imagenet2012_real", split="validation",
                                label_key="real_labels",
                                pp=pp_eval + "|onehot(1000, key='real_label', key_result='real_labels')")))


def _entries(config: Any) -> dict[str, dict]:
    evals = config.get("evals", None) or {}
    if not hasattr(evals, "items"):
        raise ConfigError(f"config.evals={evals!r} must be a dict of evaluators, name -> {{type: classification | "
                          "fewshot, dataset, split, ...}; see seqvis/train/evaluators.py.")
    out = {}
    for name, cfg in evals.items():
        field = f"config.evals.{name}"
        if not hasattr(cfg, "items"):
            raise ConfigError(f"{field}={cfg!r} must be a dict with at least 'type' (classification or fewshot).")
        cfg = dict(cfg.items())
        kind = cfg.get("type")
        if kind not in FIELDS:
            raise ConfigError(f"{field}.type={kind!r} is unknown; use one of {sorted(FIELDS)} "
                              f"(e.g. --config.evals.{name}.type=fewshot).")
        unknown = sorted(set(cfg) - set(FIELDS[kind]))
        if unknown:
            raise ConfigError(f"{field} has field(s) {unknown} that a {kind} evaluator does not know; its fields are "
                              f"{sorted(FIELDS[kind])}.")
        out[str(name)] = {**FIELDS[kind], **{k: v for k, v in cfg.items() if not _unset(v)}}
    return out


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value == "")


def _dataset_name(spec: Any, config: Any) -> str:
    """Short name of an evaluator's dataset (its preset, else its tfds name without version)."""
    if spec is None or spec == "":
        spec = config.get("data", None) or {}
    if isinstance(spec, str):
        return spec.split(":")[0].split("/")[0]
    return str(spec.get("preset", None) or spec.get("name", None) or "data").split(":")[0].split("/")[0]


def _prefix(name: str, cfg: dict, config: Any) -> str:
    if cfg["type"] == "fewshot":
        return f"fewshot/{cfg.get('key') or _dataset_name(cfg.get('dataset'), config)}/"
    return f"{name}/"


def _nonneg_int(value: Any, field: str) -> int:
    try:
        ok = not isinstance(value, bool) and float(value).is_integer() and int(value) >= 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{field}={value!r} must be a whole number >= 0.")
    return int(value)


def check_config(config: Any) -> None:
    """The checks of ``config.evals`` that need no data: types, fields, numbers, names, key clashes."""
    entries = _entries(config)
    prefixes: dict[str, str] = {}
    mains = [n for n, c in entries.items() if c["type"] == "classification" and c.get("main")]
    if len(mains) > 1:
        raise ConfigError(f"config.evals: {mains} all set main=True; at most one evaluator's results are the run's "
                          "unprefixed headline numbers in results.json.")
    for name, cfg in entries.items():
        field = f"config.evals.{name}"
        if cfg.get("every_steps") is not None:
            _nonneg_int(cfg["every_steps"], f"{field}.every_steps")
        if cfg.get("batch_size") is not None and _nonneg_int(cfg["batch_size"], f"{field}.batch_size") == 0:
            raise ConfigError(f"{field}.batch_size=0 must be a positive multiple of the device count.")
        ds = cfg.get("dataset")
        if ds is not None and not isinstance(ds, str) and not hasattr(ds, "get"):
            raise ConfigError(f"{field}.dataset={ds!r} must be a data config or a dataset name (a preset such as "
                              f"'mnist', or a tfds name).")
        if cfg["type"] == "fewshot":
            fewshot_lib.check_shots(cfg["shots"], f"{field}.shots")
            if isinstance(cfg["seeds"], bool) or _nonneg_int(cfg["seeds"], f"{field}.seeds") < 1:
                raise ConfigError(f"{field}.seeds={cfg['seeds']!r} must be >= 1 (seeds 0 .. seeds-1 each draw k-shot "
                                  "sets; the mean is reported).")
            try:
                l2 = float(cfg["l2_reg"])
            except (TypeError, ValueError):
                l2 = float("nan")
            if not (np.isfinite(l2) and l2 > 0):
                raise ConfigError(f"{field}.l2_reg={cfg['l2_reg']!r} must be a finite number > 0 (big_vision: 2**10).")
            if not isinstance(cfg["representation"], str) or not cfg["representation"]:
                raise ConfigError(f"{field}.representation={cfg['representation']!r} must be 'pre_logits' or a "
                                  "module path such as 'Transformer/encoder_norm'.")
        elif not isinstance(cfg["label_key"], str) or not cfg["label_key"]:
            raise ConfigError(f"{field}.label_key={cfg['label_key']!r} must be a feature name ('label', or the key of "
                              "a multi-hot label vector made by the pp).")
        prefix = _prefix(name, cfg, config)
        if prefix.startswith("train/"):
            raise ConfigError(f"{field}: an evaluator named 'train' would write train/... keys, which the training "
                              "metrics use; give it another name, e.g. config.evals.train_eval.")
        if prefix in prefixes:
            hint = "set config.evals.<name>.key to tell them apart" if cfg["type"] == "fewshot" else "rename one"
            raise ConfigError(f"config.evals.{prefixes[prefix]} and {field} would both write {prefix}... keys; {hint}.")
        prefixes[prefix] = name


def resolve_dataset(spec: Any, config: Any) -> ml_collections.ConfigDict:
    """An evaluator's ``dataset`` as a data config (a copy: the evaluator may set its pp).

    ``None``/``""``: ``config.data``. A name: its preset, else a tfds name with splits ``train``/``test`` and
    ``config.data.pp_eval``; either read from ``config.data.data_dir``. A dict: those fields over the
    dict's ``preset`` (e.g. ``{'preset': 'mnist', 'idx_dir': DIR}``) or over the defaults of a tfds name.
    """
    data = config.get("data", None) or ml_collections.ConfigDict()
    if spec is None or spec == "":
        out = copy.deepcopy(data)
        out.unlock()
        return out
    fields = {"name": spec} if isinstance(spec, str) else dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    preset = fields.pop("preset", None) or (fields["name"] if fields.get("name") in presets.PRESETS else None)
    if preset is not None:
        if preset not in presets.PRESETS:
            raise ConfigError(f"dataset preset {preset!r} is unknown; valid: {', '.join(presets.PRESETS)}.")
        if fields.get("name") == preset:
            fields.pop("name")
        out = presets.data_config(preset)
    else:
        out = ml_collections.ConfigDict(dict(name=fields.get("name", ""), train_split="train", eval_split="test",
                                             pp_eval=data.get("pp_eval", "decode"), cache="none"))
    out.unlock()
    out.update(fields)
    if not out.get("data_dir"):
        out.data_dir = data.get("data_dir", "") or ""
    return out


# ============================================================================ features and predictions


def representation(task, variables: dict, batch: dict, name: str = PRE_LOGITS) -> jax.Array:
    """Features ``[B, D]`` of the task's model on ``batch`` in eval mode: the input of its ``head`` module
    (``name='pre_logits'``) or the output of the module at path ``name``, averaged over the axes
    between the batch and the last one. Raises :class:`ConfigError` when the model has no such module."""
    want = "head" if name == PRE_LOGITS else name
    found: list = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and not found and "/".join(context.module.path) == want:
            found.append(args[0] if name == PRE_LOGITS else out)
        return out

    with nn.intercept_methods(interceptor):  # flax's public method-interception API
        task.model.apply(variables, *task.model_inputs(batch))
    if not found or not hasattr(found[0], "ndim") or found[0].ndim < 2:
        raise ConfigError(f"representation={name!r}: the model ({type(task.model).__name__}) has no module "
                          f"{want!r} whose {'input' if name == PRE_LOGITS else 'output'} is an array [batch, ...]; "
                          "use 'pre_logits' (the input of the module named 'head') or a module path such as "
                          "'Transformer/encoder_norm'.")
    x = found[0]
    if x.ndim > 2:
        x = jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
    return x.astype(jnp.float32)


def _variables(state) -> dict:
    return {"params": state.params, **state.model_state}


def _gather(tree: dict) -> dict:
    """Host arrays of every process, concatenated (all processes have the same padded shapes)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


# ============================================================================ evaluators


class Evaluator:
    """One named evaluator: ``run(driver, state) -> {metric: value}`` (scalars are logged)."""

    logs_results = False  # also say the results in the console (the progress line shows no eval metrics)

    def __init__(self, name: str, cfg: dict, config: Any, task):
        self.name, self.cfg, self.task = name, cfg, task
        self.field = f"config.evals.{name}"
        self.prefix = _prefix(name, cfg, config)
        self.main = bool(cfg.get("main", False))
        every = cfg.get("every_steps")
        self.every = int(config.get("eval_every_steps", 0) or 0) if every is None else int(every)
        self.batch_size = int(cfg.get("batch_size") or config.get("eval_batch_size", config.batch_size))
        if self.batch_size % jax.device_count():
            raise ConfigError(f"{self.field}.batch_size={self.batch_size} must be a multiple of the device count "
                              f"({jax.device_count()}).")
        try:
            self.data = resolve_dataset(cfg.get("dataset"), config)
        except ConfigError as e:
            raise ConfigError(f"{self.field}.dataset: {e}") from None
        if cfg.get("pp"):
            self.data.pp_eval = cfg["pp"]
        self.pp_field = f"{self.field}.pp" if cfg.get("pp") else (
            "config.data.pp_eval" if cfg.get("dataset") in (None, "") else f"{self.field}.dataset.pp_eval")
        self.builder = self._builder()
        self.seconds: list[float] = []  # wall time of each run (the cost of this evaluator)

    def _builder(self):
        try:
            return pipeline.get_builder(self.data)
        except DataError as e:
            first = str(e.__cause__ or e).strip().splitlines()[0] if str(e.__cause__ or e).strip() else ""
            raise DataError(f"{self.field}.dataset={self.data.get('name')!r} cannot be opened ({first}); use a data "
                            f"config, a preset ({', '.join(presets.PRESETS)}) or a tfds catalogue name prepared in "
                            "its data_dir.") from None

    def _check_split(self, split: str, what: str) -> int:
        try:
            n = sources.split_size(self.builder, split, self.data)
        except DataError as e:
            if "is not a split of" in str(e):
                names = sorted(self.builder.info.splits) if self.builder.info.splits else []
                raise DataError(f"{self.field}.{what}={split!r} is not a split of {self.builder.name} (its splits: "
                                f"{names}; slices such as 'train[:1000]' work too).") from None
            raise DataError(f"{self.field} ({self.builder.name} {split!r}): {e}") from None
        if n == 0:
            raise DataError(f"{self.field}.{what}={split!r} of {self.builder.name} has no examples.")
        return n

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def batches(self, split: str, examples: np.ndarray | None = None):
        return pipeline.eval_iterator(self.data, global_batch_size=self.batch_size, split=split,
                                           extra_ops=tuple(self.task.pp_ops(train=False)), examples=examples,
                                           pp_field=self.pp_field)

    def run(self, driver, state) -> dict[str, Any]:
        t0 = time.time()
        out = self._run(driver, state)
        self.seconds.append(time.time() - t0)
        return out

    def _run(self, driver, state) -> dict[str, Any]:
        raise NotImplementedError


class ClassificationEvaluator(Evaluator):
    """The task's eval step over ``split`` (module docstring); or ReaL-style multi-label accuracy."""

    def __init__(self, name, cfg, config, task):
        super().__init__(name, cfg, config, task)
        self.split = cfg.get("split") or self.data.get("eval_split", "test")
        self._check_split(self.split, "split")
        self.label_key = cfg.get("label_key", "label")
        self._fn: Callable | None = None

    def _run(self, driver, state):
        if self.label_key == "label":
            return self._task_metrics(driver, state)
        return self._multilabel(driver, state)

    def _task_metrics(self, driver, state) -> dict[str, float]:
        """Masked sums over every example of the split exactly once."""
        totals: dict[str, float] = {}
        for batch in self.batches(self.split):
            sums = driver.fetch(driver.evaluate(state, driver.put_batch(batch)))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        count = totals.pop("count", 0.0)
        out = {k: v / max(count, 1.0) for k, v in totals.items()}
        out["num_examples"] = int(count)
        return out

    def _multilabel(self, driver, state) -> dict[str, float]:
        key = self.label_key
        if self._fn is None:
            def fn(state_, batch):
                logits = self.task.model.apply(_variables(state_), *self.task.model_inputs(batch))
                labels = batch[key]
                top1 = jnp.take_along_axis(labels, jnp.argmax(logits, -1)[:, None], axis=1)[:, 0]
                valid = batch["mask"] * (jnp.max(labels, axis=-1) > 0)
                return {"correct": (top1 > 0) * valid, "valid": valid}

            self._fn = driver.per_example(fn)
        correct = valid = 0.0
        for batch in self.batches(self.split):
            if key not in batch or np.ndim(batch[key]) != 3:
                raise DataError(f"{self.field}.label_key={key!r}: the batches of {self.builder.name} "
                                f"{self.split!r} have no multi-hot '{key}' [batch, classes] (keys: {sorted(batch)}); "
                                f"make it in the pp, e.g. |onehot(1000, key='real_label', key_result='{key}').")
            out = _gather(self._fn(state, driver.put_batch(batch)))
            correct += float(np.sum(out["correct"], dtype=np.float64))
            valid += float(np.sum(out["valid"], dtype=np.float64))
        return {"accuracy": correct / max(valid, 1.0), "num_examples": int(valid)}


class FewshotEvaluator(Evaluator):
    """Few-shot linear transfer (module docstring)."""

    logs_results = True

    def __init__(self, name, cfg, config, task):
        super().__init__(name, cfg, config, task)
        self.train_split = cfg.get("train_split") or self.data.get("train_split", "train")
        self.split = cfg.get("split") or self.data.get("eval_split", "test")
        self._check_split(self.train_split, "train_split")
        self._check_split(self.split, "split")
        self.shots = fewshot_lib.check_shots(cfg["shots"], f"{self.field}.shots")
        self.seeds = int(cfg["seeds"])
        self.l2_reg = float(cfg["l2_reg"])
        self.representation = cfg["representation"]
        self.num_classes = self._num_classes(cfg.get("num_classes"))
        labels = sources.split_labels(self.builder, self.train_split, self.data)
        what = f"{self.field}.train_split={self.train_split!r} of {self.builder.name}"
        self.sets = [fewshot_lib.kshot_indices(labels, self.shots, s, self.num_classes, what)
                     for s in range(self.seeds)]
        self.pool = np.unique(np.concatenate([idx for sets in self.sets for idx in sets.values()]))
        self.dim = self._trace_features(task)
        self._fn: Callable | None = None

    def _num_classes(self, given) -> int:
        if given:
            return int(given)
        feature = self.builder.info.features["label"] if "label" in self.builder.info.features else None
        k = getattr(feature, "num_classes", None)
        if not k:
            raise ConfigError(f"{self.field}: {self.builder.name} has no 'label' class feature to draw k-shot sets "
                              f"by; few-shot evaluation needs one (set {self.field}.num_classes if its labels are "
                              "integers without class info).")
        return int(k)

    def _trace_features(self, task) -> int:
        """The feature width, from tracing the extraction on a dummy batch (shapes only, nothing compiled)."""
        dummy = task.dummy_batch(2)
        variables = jax.eval_shape(task.init, jax.random.PRNGKey(0), dummy)
        try:
            shape = jax.eval_shape(lambda v, b: representation(task, v, b, self.representation), variables, dummy)
        except ConfigError as e:
            raise ConfigError(f"{self.field}.{e}") from None
        return int(shape.shape[-1])

    def features(self, driver, state, split: str, examples: np.ndarray | None = None):
        """``(features [n, D] float32, labels [n])`` of the split (or of ``examples`` of it, in index order)."""
        if self._fn is None:
            name = self.representation

            def fn(state_, batch):
                return {"x": representation(self.task, _variables(state_), batch, name),
                        "label": batch["label"], "mask": batch["mask"]}

            self._fn = driver.per_example(fn)
        xs, ys = [], []
        for batch in self.batches(split, examples):
            out = _gather(self._fn(state, driver.put_batch(batch)))
            keep = out["mask"] > 0
            xs.append(out["x"][keep])
            ys.append(out["label"][keep])
        return np.concatenate(xs), np.concatenate(ys).astype(np.int64)

    def _run(self, driver, state):
        x_pool, y_pool = self.features(driver, state, self.train_split, self.pool)
        if len(x_pool) != len(self.pool):
            raise DataError(f"{self.field}: read {len(x_pool)} of the {len(self.pool)} k-shot examples of "
                            f"{self.builder.name} {self.train_split!r}; is the split's size stable?")
        x_test, y_test = self.features(driver, state, self.split)
        out: dict[str, Any] = {}
        for k in self.shots:
            accs = []
            for sets in self.sets:
                rows = np.searchsorted(self.pool, sets[k])
                accs.append(fewshot_lib.fewshot_lsr(x_pool[rows], y_pool[rows], x_test, y_test, self.num_classes,
                                                    self.l2_reg))
            out[f"{k}shot"] = float(np.mean(accs))
            out[f"{k}shot_per_seed"] = accs
        return out


TYPES = {"classification": ClassificationEvaluator, "fewshot": FewshotEvaluator}


# ============================================================================ the set the trainer runs


class Evaluators:
    """The run's evaluators: each on its own schedule, each writing its own keys."""

    def __init__(self, evaluators: list[Evaluator]):
        self.evaluators = evaluators

    def __iter__(self):
        return iter(self.evaluators)

    def run(self, step: int, driver, state, writer, *, final: bool = False) -> dict[str, Any]:
        """Run the evaluators due at ``step`` (all of them when ``final``), write each one's row to ``writer``
        (``<prefix><metric>``, scalars only), and return what results.json gets: the main evaluator's
        values unprefixed, every other's under its keys."""
        results: dict[str, Any] = {}
        for ev in self.evaluators:
            if not (final or ev.due(step)):
                continue
            out = ev.run(driver, state)
            writer.write(step, {k: v for k, v in out.items() if np.ndim(v) == 0}, prefix=ev.prefix)
            if ev.logs_results:
                log.info("%s at step %d: %s (%.1f s)", ev.prefix.rstrip("/"), step,
                         " ".join(f"{k}={v:.4g}" for k, v in out.items() if np.ndim(v) == 0), ev.seconds[-1])
            results.update(out if ev.main else {f"{ev.prefix}{k}": v for k, v in out.items()})
        return results


def from_config(config: Any, task) -> Evaluators:
    """The evaluators of ``config.evals`` (plus the default one, module docstring), with their datasets
    opened and splits checked, k-shot sets drawn and features traced: errors surface here, before any
    compilation."""
    check_config(config)
    entries = _entries(config)
    if not any(c["type"] == "classification" for c in entries.values()):
        entries = {DEFAULT_NAME: {**FIELDS["classification"], "type": "classification", "main": True}, **entries}
    return Evaluators([TYPES[cfg["type"]](name, cfg, config, task) for name, cfg in entries.items()])
