"""Named evaluators (config.evals): schedules, keys, the few-shot evaluator end to end, the ImageNet recipes'
evaluation sets on tfds mock data, and the errors a user can cause (all before anything is compiled).

Runs on the toy Fashion-MNIST IDX files of test_train (class c: a bright bar at rows 2c+3, 2c+4).
"""

import csv
import glob
import json
import os
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

from seqvis.data import pipeline
from seqvis.data import sources
from seqvis.errors import ConfigError, DataError
from seqvis.evaluation import fewshot as fewshot_lib
from seqvis.models import vit
from seqvis.train import evaluators as evals_lib
from seqvis.train import metrics as metrics_lib
from seqvis.train import step as step_lib
from seqvis.tasks.classification import ClassificationTask
from seqvis.trainer import train_and_evaluate
from test_configs import load, shrink
from test_train import N_TEST, idx_dir, tiny_config  # noqa: F401 - idx_dir is a fixture

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rows_of(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def steps_with(rows, key):
    return [r["step"] for r in rows if key in r]


# ============================================================================ schedules and keys


def three_evaluators(idx_dir, tmp_path, **kw):  # noqa: F811
    c = tiny_config(idx_dir, tmp_path, total_steps=6, **kw)
    c.evals = dict(
        test=dict(type="classification", every_steps=2, main=True),
        train_part=dict(type="classification", split="train[:64]", every_steps=3),
        fs=dict(type="fewshot", shots=(1, 2), seeds=2, every_steps=4),
    )
    return c


def test_each_evaluator_runs_on_its_schedule_and_writes_its_keys(idx_dir, tmp_path):  # noqa: F811
    workdir = str(tmp_path / "run")
    results = train_and_evaluate(three_evaluators(idx_dir, tmp_path), workdir)
    rows = rows_of(workdir)
    assert steps_with(rows, "test/accuracy") == [2, 4, 6]  # every 2 steps, and after the last
    assert steps_with(rows, "train_part/accuracy") == [3, 6]
    assert steps_with(rows, "fewshot/fashion_mnist/1shot") == [4, 6]
    assert steps_with(rows, "fewshot/fashion_mnist/2shot") == [4, 6]
    assert not steps_with(rows, "eval/accuracy")  # a classification evaluator replaces the default one
    for r in rows:  # one evaluator per row: its keys only
        prefixes = {k.split("/")[0] for k in r if k != "step"}
        assert len(prefixes) == 1, r
    by_step = {(r["step"], k): v for r in rows for k, v in r.items()}
    # results.json: the main evaluator unprefixed, the others under their keys (the final rows' values).
    with open(os.path.join(workdir, "results.json")) as f:
        on_disk = json.load(f)
    assert on_disk["accuracy"] == by_step[(6, "test/accuracy")] and on_disk["num_examples"] == N_TEST
    assert on_disk["train_part/num_examples"] == 64
    assert on_disk["train_part/accuracy"] == by_step[(6, "train_part/accuracy")]
    for k in (1, 2):
        per_seed = on_disk[f"fewshot/fashion_mnist/{k}shot_per_seed"]
        assert len(per_seed) == 2 and all(0.0 <= a <= 1.0 for a in per_seed)
        assert on_disk[f"fewshot/fashion_mnist/{k}shot"] == pytest.approx(np.mean(per_seed))
        assert on_disk[f"fewshot/fashion_mnist/{k}shot"] == by_step[(6, f"fewshot/fashion_mnist/{k}shot")]
    assert results["fewshot/fashion_mnist/1shot"] == on_disk["fewshot/fashion_mnist/1shot"]
    # TensorBoard has the same scalars.
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    tags = set()
    for path in glob.glob(os.path.join(workdir, "tensorboard", "**", "*tfevents*"), recursive=True):
        for raw in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(raw.numpy())
            tags |= {(int(event.step), v.tag) for v in event.summary.value}
    assert {(4, "fewshot/fashion_mnist/1shot"), (6, "fewshot/fashion_mnist/2shot"), (3, "train_part/loss"),
            (2, "test/accuracy")} <= tags


def test_fewshot_only_keeps_the_default_evaluation(idx_dir, tmp_path):  # noqa: F811
    """Few-shot evaluators add to the run's own eval_split evaluation (eval/..., unprefixed in results.json)."""
    c = tiny_config(idx_dir, tmp_path, total_steps=4, eval_every_steps=2)
    c.evals = dict(fs=dict(type="fewshot", shots=(1,), seeds=1, key="fmnist"))
    workdir = str(tmp_path / "run")
    results = train_and_evaluate(c, workdir)
    rows = rows_of(workdir)
    assert steps_with(rows, "eval/accuracy") == [2, 4]
    assert steps_with(rows, "fewshot/fmnist/1shot") == [2, 4]  # every_steps defaults to config.eval_every_steps
    assert results["num_examples"] == N_TEST and "accuracy" in results and "fewshot/fmnist/1shot" in results


def test_final_rows_of_every_evaluator_are_dropped_when_the_end_is_repeated(tmp_path):
    """A re-run resumed at the last step repeats the final evaluation: all its rows go, not only eval/."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 6, "train/loss": 1.0}, {"step": 4, "fewshot/x/1shot": 0.5}, {"step": 6, "eval/accuracy": 0.5},
            {"step": 6, "fewshot/x/1shot": 0.6}, {"step": 6, "val/accuracy": 0.7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert metrics_lib.truncate_jsonl(str(path), resume_step=6, total_steps=6) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:2]


def test_sweep_results_csv_has_the_evaluator_columns(idx_dir, tmp_path):  # noqa: F811
    from experiments import sweep as sweep_lib

    base = tiny_config(idx_dir, tmp_path, total_steps=4)
    base.evals = dict(fs=dict(type="fewshot", shots=(1, 2), seeds=1))
    sweep_lib.Sweep("toy", "toy-sweep", str(tmp_path / "sweep"), base_config=base, points=[{"seed": 0}]).run()
    with open(tmp_path / "sweep" / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    with open(os.path.join(table[0]["workdir"], "results.json")) as f:
        results = json.load(f)
    assert float(table[0]["fewshot/fashion_mnist/2shot"]) == results["fewshot/fashion_mnist/2shot"]
    per_seed = "fewshot/fashion_mnist/1shot_per_seed"
    assert json.loads(table[0][per_seed]) == results[per_seed]


def test_dataset_names_and_dicts_resolve_to_data_configs(idx_dir, tmp_path):  # noqa: F811
    config = tiny_config(idx_dir, tmp_path)
    config.data.pp_eval = "decode|value_range(0, 1)"
    mnist = evals_lib.resolve_dataset({"preset": "mnist", "idx_dir": "/somewhere"}, config)
    assert (mnist.name, mnist.idx_dir, mnist.pp_eval) == ("mnist_idx", "/somewhere", "decode|value_range(-1, 1)")
    assert mnist.data_dir == config.data.data_dir  # prepared beside the training set
    v2 = evals_lib.resolve_dataset("imagenet_v2", config)
    assert (v2.name, v2.pp_eval, v2.eval_split) == ("imagenet_v2", config.data.pp_eval, "test")
    own = evals_lib.resolve_dataset("", config)
    assert own.to_dict() == config.data.to_dict() and own is not config.data
    with pytest.raises(ConfigError, match="dataset preset 'mnst' is unknown"):
        evals_lib.resolve_dataset({"preset": "mnst"}, config)


# ============================================================================ few-shot evaluator on known features


class BarOneHot(nn.Module):
    """Features = the one-hot label of the toy images (the brightest pair of rows 2c+3, 2c+4), then a head."""

    random: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        if self.random:  # independent of the image: a fixed draw per position in the batch
            feats = jax.random.normal(jax.random.PRNGKey(0), (x.shape[0], 16))
        else:
            rows = jnp.mean(x[:, 3:23, 4:24, 0], axis=2)  # [B, 20]
            feats = jax.nn.one_hot(jnp.argmax(rows.reshape(-1, 10, 2).mean(-1), -1), 10)
        return nn.Dense(10, name="head")(feats)


class BarTask(ClassificationTask):
    def build_model(self):
        return BarOneHot(random=bool(self.config.model.get("random", False)))


def evaluate_once(config, task, parallel="pmap"):
    """The evaluators of ``config`` built and run once on an initial state, as the trainer does."""
    evs = evals_lib.from_config(config, task)
    tx = optax.sgd(0.0)
    driver = step_lib.make_driver(parallel, step_lib.make_train_step(task, tx, optax.constant_schedule(0.0)),
                                  step_lib.make_eval_step(task))
    dummy = task.dummy_batch(config.batch_size // jax.device_count())
    state = driver.put_state(driver.create_state(lambda: step_lib.create_state(task, tx, 0, dummy)))
    writer = types.SimpleNamespace(rows=[], write=lambda step, row, prefix="": writer.rows.append((prefix, row)))
    return evs, driver, state, evs.run(0, driver, state, writer, final=True)


def bar_config(idx_dir, tmp_path, random=False, **fs):  # noqa: F811
    c = tiny_config(idx_dir, tmp_path)
    c.model = dict(name="bar", random=random)
    c.evals = dict(fs=dict(type="fewshot", shots=(1, 5), seeds=3, **fs))
    return c


@pytest.mark.parametrize("parallel", ["pmap", "mesh"])
def test_one_hot_features_give_100_percent_at_one_shot(idx_dir, tmp_path, parallel):  # noqa: F811
    config = bar_config(idx_dir, tmp_path)
    evs, driver, state, results = evaluate_once(config, BarTask(config), parallel)
    assert results["fewshot/fashion_mnist/1shot"] == 1.0
    assert results["fewshot/fashion_mnist/5shot"] == 1.0
    # The k-shot sets the evaluator drew: balanced, nested, one per seed, and the rows it read for them carry the
    # labels of those examples (the subset of the split was read in index order).
    fs = [e for e in evs if e.prefix.startswith("fewshot/")][0]
    labels = sources.split_labels(fs.builder, "train", fs.data)
    for sets in fs.sets:
        assert np.bincount(labels[sets[1]], minlength=10).tolist() == [1] * 10
        assert np.bincount(labels[sets[5]], minlength=10).tolist() == [5] * 10
        assert set(sets[1]) <= set(sets[5])
    assert len({tuple(s[5]) for s in fs.sets}) == 3
    _, y_pool = fs.features(driver, state, "train", fs.pool)
    np.testing.assert_array_equal(y_pool, labels[fs.pool])


def test_random_features_are_about_chance(idx_dir, tmp_path):  # noqa: F811
    config = bar_config(idx_dir, tmp_path, random=True)
    _, _, _, results = evaluate_once(config, BarTask(config))
    # 203 test images, features independent of the labels: Binomial(203, 0.1)/203 has sd 0.021 per seed;
    # the mean over 3 seeds is within 0.09 of chance (over 7 sd of the mean) unless the labels leak in.
    for k in (1, 5):
        assert abs(results[f"fewshot/fashion_mnist/{k}shot"] - 0.1) < 0.09


def test_fewshot_matches_features_computed_directly(idx_dir, tmp_path):  # noqa: F811
    """The evaluator's accuracy equals fewshot_lsr on features computed by one model call on the decoded IDX
    images, outside the input pipeline and the devices (a trained-from-init ViT: features of no special form)."""
    config = tiny_config(idx_dir, tmp_path)
    config.evals = dict(fs=dict(type="fewshot", shots=(2,), seeds=2, l2_reg=1.0))
    task = ClassificationTask(config)
    evs, driver, state, results = evaluate_once(config, task)
    fs = [e for e in evs if e.prefix.startswith("fewshot/")][0]
    host = driver.get_state(state)
    variables = {"params": host.params, **host.model_state}

    def feats(split):  # the prepared split in file order (the order the k-shot indices refer to)
        arrays = list(sources.as_dataset(fs.builder, split, fs.data).batch(1024).as_numpy_iterator())
        images, labels = (np.concatenate([a[k] for a in arrays]) for k in ("image", "label"))
        x = images.astype(np.float32) / 255.0 * 2.0 - 1.0  # pp_eval: decode|value_range(-1, 1)
        f = jax.jit(lambda v, b: evals_lib.representation(task, v, {"image": b}))(variables, x)
        return np.asarray(f), labels.astype(np.int64)

    x_train, y_train = feats("train")
    x_test, y_test = feats("test")
    accs = [fewshot_lib.fewshot_lsr(x_train[s[2]], y_train[s[2]], x_test, y_test, 10, 1.0) for s in fs.sets]
    # Same model, same images; a batch of 8 per device vs one call can differ in the last float32 bit, which can
    # flip a prediction only at a near-tie: allow one of the 203 test images per seed.
    assert abs(results["fewshot/fashion_mnist/2shot"] - np.mean(accs)) <= 1.0 / N_TEST


# ============================================================================ representations


def test_pre_logits_is_the_head_input_and_module_paths_work():
    model = vit.build("mu/7", num_classes=10, width=32, depth=1, mlp_dim=64, num_heads=2, representation_size=16)
    task = types.SimpleNamespace(model=model, model_inputs=lambda b: (b["image"],))
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 28, 28, 1))
    variables = model.init(jax.random.PRNGKey(0), images)
    feats = evals_lib.representation(task, variables, {"image": images})
    assert feats.shape == (3, 16)
    head = variables["params"]["head"]
    logits = model.apply(variables, images)
    np.testing.assert_allclose(feats @ head["kernel"] + head["bias"], logits, rtol=1e-5, atol=1e-5)  # float32
    _, tokens = model.apply(variables, images, return_features=True)
    tok = evals_lib.representation(task, variables, {"image": images}, "Transformer")
    np.testing.assert_allclose(tok, tokens.mean(axis=1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match="no module 'Transformer/nope'"):
        evals_lib.representation(task, variables, {"image": images}, "Transformer/nope")


# ============================================================================ multi-label (ReaL) accuracy


def test_onehot_op_makes_multi_hot_vectors():
    import tensorflow as tf

    from seqvis.data import preprocess

    op = preprocess.parse("onehot(5, key='real', key_result='m')")[0]
    for labels, want in (([1, 3], [0, 1, 0, 1, 0]), ([], [0] * 5), ([2, 2], [0, 0, 1, 0, 0])):
        out = op({"real": tf.constant(labels, tf.int64)})
        assert out["m"].numpy().tolist() == want and "real" not in out
    assert preprocess.parse("onehot(3)")[0]({"label": tf.constant(1)})["labels"].numpy().tolist() == [0, 1, 0]


def test_multi_label_accuracy_equals_top1_on_single_labels(idx_dir, tmp_path):  # noqa: F811
    """With the multi-hot of the single label, the ReaL-style accuracy is the ordinary top-1 accuracy."""
    config = tiny_config(idx_dir, tmp_path)
    config.evals = dict(
        top1=dict(type="classification", main=True),
        multi=dict(type="classification", label_key="ml",
                   pp="decode|value_range(-1, 1)|onehot(10, key='label', key_result='ml')"),
        none=dict(type="classification", label_key="ml",  # no labels at all: every image is left out
                  pp="decode|value_range(-1, 1)|onehot(10, key='label', key_result='ml', on=0.0)"))
    _, _, _, results = evaluate_once(config, ClassificationTask(config))
    assert results["multi/accuracy"] == results["accuracy"] and results["multi/num_examples"] == N_TEST
    assert results["none/num_examples"] == 0


# ============================================================================ the ImageNet recipes


@pytest.mark.parametrize("name", ["vit_i1k.py", "vit_s16_i1k_baseline.py"])
def test_imagenet_recipes_evaluate_minival_val_v2_and_real(name, tmp_path):
    config = shrink(load(os.path.join(REPO, "configs", name), None))
    assert sorted(config.evals) == ["minival", "real", "v2", "val"]
    # minival is exactly what the training split leaves out (1,281,167 training images; the split arithmetic
    # of tfds' ReadInstruction, which reads only num_examples of the split info).
    info = {"train": types.SimpleNamespace(num_examples=1_281_167)}
    (train,), (mini,) = (tfds.core.ReadInstruction.from_spec(s).to_absolute(info)
                         for s in (config.data.train_split, config.evals.minival.split))
    assert (train.from_, train.to, mini.from_, mini.to) == (None, 1_268_355, 1_268_355, None)
    config.data.data_dir = str(tmp_path / "tfds")
    with tfds.testing.mock_data(num_examples=24):
        results = train_and_evaluate(config, str(tmp_path / "w"))
    assert results["num_examples"] == 24  # val: the headline numbers
    for ev in ("minival", "v2"):
        assert results[f"{ev}/num_examples"] == 24 and 0.0 <= results[f"{ev}/accuracy"] <= 1.0
    # ReaL: mock images have random label lists, some empty (left out).
    assert 0 <= results["real/num_examples"] <= 24 and 0.0 <= results["real/accuracy"] <= 1.0


# ============================================================================ the command line


def parse_flags(monkeypatch, argv):
    """``--config`` parsed as seqvis.cli.train parses it (config_flags reads the override names from sys.argv)."""
    from absl import flags
    from ml_collections import config_flags

    monkeypatch.setattr(sys, "argv", ["prog"] + argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
    fv(["prog"] + argv)
    return fv.config


def test_command_line_forms_that_add_a_fewshot_evaluator(monkeypatch):
    vit_py = os.path.join(REPO, "configs", "vit.py")
    c = parse_flags(monkeypatch, [f"--config={vit_py}:fewshot", "--config.evals.fewshot_fashion_mnist.shots=(1,10)"])
    assert c.evals.fewshot_fashion_mnist.type == "fewshot" and tuple(c.evals.fewshot_fashion_mnist.shots) == (1, 10)
    evals_lib.check_config(c)
    c = parse_flags(monkeypatch, [f"--config={vit_py}:fewshot=mnist+fashion_mnist"])
    assert sorted(c.evals) == ["fewshot_fashion_mnist", "fewshot_mnist"] and c.evals.fewshot_mnist.dataset == "mnist"
    c = parse_flags(monkeypatch, [f"--config={vit_py}", "--config.evals={'fs': {'type': 'fewshot', 'dataset': 'mnist', "
                                           "'shots': (1, 5)}}"])
    assert c.evals.fs.dataset == "mnist" and tuple(c.evals.fs.shots) == (1, 5)
    evals_lib.check_config(c)
    c = parse_flags(monkeypatch, [f"--config={vit_py}", "--config.evals={'fs': {'type': 'fewshot', 'dataset': "
                                                        "{'preset': 'mnist', 'idx_dir': '/x'}}}"])
    evals_lib.check_config(c)
    assert evals_lib.resolve_dataset(c.evals.fs.dataset, c).idx_dir == "/x"
    # A new entry by dotted path is what ml_collections cannot do (hence the two forms above); seqvis.cli.train says so.
    argv = [f"--config={vit_py}", "--config.evals.fs.type=fewshot"]
    with pytest.raises(Exception, match="fs") as refused:
        parse_flags(monkeypatch, argv)
    from seqvis.cli import config_cli

    line = config_cli.explain_flag_error(argv, refused.value)
    assert "a dotted path cannot add a field to config.evals" in line and "--config.evals=" in line


# ============================================================================ errors, before any compilation


@pytest.fixture
def no_compile(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("reached the driver: the error was not raised before compiling")

    monkeypatch.setattr(step_lib, "make_driver", refuse)


@pytest.mark.parametrize("entry,error,message", [
    (dict(type="linear"), ConfigError, r"config.evals.x.type='linear' is unknown; use one of \['classification'"),
    (dict(type="fewshot", every_step=2), ConfigError, r"config.evals.x has field\(s\) \['every_step'\]"),
    (dict(type="fewshot", shots=(0, 5)), ConfigError, r"config.evals.x.shots=\(0, 5\) must be distinct whole"),
    (dict(type="fewshot", l2_reg=0.0), ConfigError, r"config.evals.x.l2_reg=0.0 must be a finite number > 0"),
    (dict(type="classification", dataset="no_such_dataset_xyz"), DataError,
     r"config.evals.x.dataset='no_such_dataset_xyz' cannot be opened \(Dataset no_such_dataset_xyz not found"),
    (dict(type="fewshot", dataset="cifar10"), DataError, r"config.evals.x \(cifar10 'train'\): Dataset 'cifar10' is "
                                                         r"not prepared"),
    (dict(type="classification", split="validation"), DataError,
     r"config.evals.x.split='validation' is not a split of fashion_mnist_idx \(its splits: \['test', 'train'\]"),
    (dict(type="fewshot", train_split="nosuch"), DataError, r"config.evals.x.train_split='nosuch' is not a split"),
    (dict(type="fewshot", shots=(1, 100)), DataError, r"fewer than the 100 shots asked for"),
    (dict(type="fewshot", representation="Transformer/nope"), ConfigError,
     r"config.evals.x.representation='Transformer/nope': the model \(ViT\) has no module 'Transformer/nope'"),
])
def test_errors_before_compiling(idx_dir, tmp_path, no_compile, entry, error, message):  # noqa: F811
    config = tiny_config(idx_dir, tmp_path)
    config.evals = {"x": entry}
    with pytest.raises(error, match=message):
        train_and_evaluate(config, str(tmp_path / "w"))
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_name_clashes_are_config_errors(idx_dir, tmp_path):  # noqa: F811
    config = tiny_config(idx_dir, tmp_path)
    config.evals = {"train": dict(type="classification", split="train[:64]")}
    with pytest.raises(ConfigError, match="an evaluator named 'train' would write train/"):
        evals_lib.check_config(config)
    config.evals = {"a": dict(type="fewshot"), "b": dict(type="fewshot", shots=(1,))}
    with pytest.raises(ConfigError, match=r"config.evals.a and config.evals.b would both write fewshot/fashion_mnist/"):
        evals_lib.check_config(config)
    config.evals = {"a": dict(type="classification", main=True), "b": dict(type="classification", main=True)}
    with pytest.raises(ConfigError, match="all set main=True"):
        evals_lib.check_config(config)
    config.evals = ml_collections.ConfigDict({"a": dict(type="fewshot", seeds=0)})
    with pytest.raises(ConfigError, match="seeds=0 must be >= 1"):
        evals_lib.check_config(config)
