"""configs/sweeps/scaling_paper.py: every point builds; one point trains one step on mock data."""

import os

import pytest
import tensorflow_datasets as tfds

from experiments import sweep as sweep_lib
from seqvis.evaluation import flops

BASE = "configs/vit.py:B/16,imagenet2012"


@pytest.fixture(scope="module")
def paper_sweep(tmp_path_factory):
    return sweep_lib.Sweep(BASE, "configs/sweeps/scaling_paper.py", str(tmp_path_factory.mktemp("paper")))


def test_every_point_builds(paper_sweep):
    points = paper_sweep.points
    assert len(points) == (7 + 2) * 4  # (ViTs + ResNets) x (2 ImageNet-1k + 2 ImageNet-21k budgets)
    models = {p.info["model"] for p in points}
    assert {"ViT w192 d12 p16", "ViT w1280 d32 p14", "ResNet-50 w64", "ResNet-101 w64"} <= models
    by_name = {(p.overrides.get("model.variant") or p.config_spec, p.config.data.name): p for p in points}
    # Published sizes at 1000 classes: ViT-B/16 86.6M (86,567,656), ResNet-50 25,557,032.
    assert by_name[("B/16", "imagenet2012")].info["params"] == 86_567_656
    assert by_name[("configs/resnet.py:50,imagenet2012", "imagenet2012")].info["params"] == 25_557_032
    # ImageNet-21k points get the 21,843-class head: B/16 grows by 768 x 20,843 weights + 20,843 biases.
    assert by_name[("B/16", "imagenet21k")].info["params"] - 86_567_656 == 769 * 20_843
    # ViT-B/16 at 224: 17.6 G multiply-adds.
    assert by_name[("B/16", "imagenet2012")].info["analytic_gflops_per_example"] / 2 == pytest.approx(17.6, rel=0.01)
    for p in points:
        assert p.config.num_epochs in (30.0, 90.0, 300.0)


def test_one_point_trains_one_step_on_mock_data(paper_sweep, tmp_path):
    point = next(p for p in paper_sweep.points if p.overrides == {"model.variant": "Ti/16", "num_epochs": 90.0})
    assert point.info["params"] == 5_717_416  # ViT-Ti/16, 1000 classes, as built by the sweep
    # As configured, except two of the 12 layers (the compile of the full depth took 51-83 s of a test that is
    # about the point's pipeline, not its depth), a batch that fits a CPU test, one step and no background
    # saving (tfds.testing.mock_data patches file I/O while a dataset is open).
    point.config = sweep_lib.apply_overrides(point.config, {
        "model.depth": 2, "batch_size": 8, "eval_batch_size": 8, "total_steps": 1, "schedule.warmup_steps": 0,
        "async_checkpointing": False, "progress": False, "data.data_dir": str(tmp_path / "tfds")}, "test")
    with tfds.testing.mock_data(num_examples=16):
        row = paper_sweep.run_point(point)
    assert row["status"] == "ok", row["message"]
    assert row["steps"] == 1 and row["examples_seen"] == 8 and row["num_examples"] == 16
    # Worked by hand: a Ti layer (width 192, MLP 768) has 4 x (192 x 192 + 192) attention + (192 x 768 + 768)
    # + (768 x 192 + 192) MLP + 4 x 192 LayerNorm = 444,864 weights; the 12-layer model has 5,717,416, so two
    # layers leave 5,717,416 - 10 x 444,864.
    assert row["params"] == 5_717_416 - 10 * 444_864
    # XLA's count of the compiled step against the analytic count of the model that ran (2 layers at 224 px).
    analytic = flops.vit_flops_breakdown(image_shape=(224, 224, 3), patch_size=16, width=192, depth=2, mlp_dim=768,
                                         num_classes=1000)["total"]
    assert row["gflops_per_example"] == pytest.approx(analytic / 1e9, rel=0.02)
    assert os.path.isfile(os.path.join(row["workdir"], "results.json"))
