"""experiments.data_size: curves, gaps, crossover and verdicts on hand-made rows (no training)."""

import math

import pytest

from experiments import data_size as ds

AUG = "decode|random_crop(28, pad=2)|flip_lr|value_range(-1, 1)"


def row(model, family, params, size, seed, error, steps, pp=AUG):
    return {"point": f"{model}-{size}-{seed}-{steps}-{pp}", "model": model, "family": family, "params": params,
            "error": error, "steps": steps, "examples_seen": steps * 128, "epochs": steps * 128 / size,
            "wall_seconds": 1.0, "overrides": {"data.train_examples": size, "seed": seed, "data.pp_train": pp}}


def rows(vit_at_8k):
    out = []
    # ResNet 30, 20, 15 %; ViT 40, 24, then vit_at_8k; two seeds (±1 point) at 500 and 2000
    for size, r_err, v_err, steps in ((500, 0.30, 0.40, 100), (2000, 0.20, 0.24, 200)):
        for seed, d in ((0, -0.01), (1, 0.01)):
            out.append(row("R", "resnet", 150_000, size, seed, r_err + d, steps))
            out.append(row("V", "vit", 100_000, size, seed, v_err + d, steps))
    out.append(row("R", "resnet", 150_000, 8000, 0, 0.15, 400))
    out.append(row("V", "vit", 100_000, 8000, 0, vit_at_8k, 400))
    out.append(row("V", "vit", 100_000, 500, 0, 0.385, 200))  # longer training: 0.39 -> 0.385
    out.append(row("V", "vit", 100_000, 500, 0, 0.45, 100, pp="decode"))  # no augmentation
    other = row("R", "resnet", 150_000, 500, 2, 0.05, 100)  # another recipe: not a third seed of R
    other["overrides"]["batch_size"] = 32
    out.append(other)
    return out


def evidence(vit_at_8k):
    curves, longer, aug, pp, others = ds.split_rows(ds.annotate(rows(vit_at_8k)))
    assert [(r["model"], r["size"]) for r in others] == [("R", 500)]
    floor = ds.noise_floor(curves)
    return {"curves": curves, "gaps": ds.gap_series(curves, floor), "longer": longer, "aug": aug, "floor": floor}, pp


def test_groups_gaps_and_crossover():
    ev, pp = evidence(0.13)
    assert pp == AUG
    v500 = ev["curves"]["V"][500]
    assert v500["seeds"] == 2 and v500["mean"] == pytest.approx(0.40) and v500["steps"] == 100
    assert v500["std"] == pytest.approx(0.02 / math.sqrt(2))  # sample std of 0.39, 0.41
    assert ev["floor"] == pytest.approx(0.02 / math.sqrt(2))
    best = ev["gaps"]["best ViT − best ResNet"]
    assert [p["size"] for p in best] == [500, 2000, 8000]
    assert [round(p["gap"], 6) for p in best] == [0.10, 0.04, -0.02]
    # two seeds each: SE = sqrt(2 · std² / 2) = std; one seed each at 8k: floor · sqrt(2)
    assert best[0]["se"] == pytest.approx(0.02 / math.sqrt(2))
    assert best[2]["se"] == pytest.approx(0.02)
    # gap +0.04 at 2000, -0.02 at 8000: zero 2/3 of the way in log size
    assert ds.crossover(best) == pytest.approx(2000 * 4 ** (2 / 3))
    assert ds.slope_per_decade(best) < 0
    assert [(c["size"], c["steps"], c["base"]["steps"]) for c in ev["longer"]] == [(500, 200, 100)]
    assert ev["longer"][0]["base"]["mean_shared_seeds"] == pytest.approx(0.39)  # seed 0 only
    assert [(a["pp"], a["size"]) for a in ev["aug"]] == [("decode", 500)]
    assert ds.longer_gaps(ev["longer"]) == []  # only the ViT has a longer point


def test_gap_at_the_longer_budget():
    extra = [row("R", "resnet", 150_000, 500, 0, 0.27, 200)]  # R seed 0: 0.29 -> 0.27
    ev_rows = ds.annotate(rows(0.13) + extra)
    _, longer, *_ = ds.split_rows(ev_rows)
    (g,) = ds.longer_gaps(longer)
    # seed 0 at 100 steps: V 0.39 - R 0.29; at 200 steps: V 0.385 - R 0.27
    assert (g["size"], g["steps"], g["longer_steps"]) == (500, [100], [200])
    assert g["gap"] == pytest.approx(0.10) and g["gap_longer"] == pytest.approx(0.115)


@pytest.mark.parametrize("vit_at_8k, passes", [(0.13, "does not hold"), (0.09, "holds")])
def test_verdicts(vit_at_8k, passes):
    ev, _ = evidence(vit_at_8k)
    verdicts = {f["finding"].split(" (")[0]: f["verdict"] for f in ds.findings(ev)}
    assert verdicts["ResNet beats ViT at small data"] == "holds"  # +10 points, SE 1.4
    assert verdicts["The gap shrinks with data"] == "holds"
    # -2 points with SE 2 (single seeds) is noise; -6 points is not
    assert verdicts["ViT passes ResNet at full data"] == passes
    assert verdicts["Small sets are trained long enough"] == "holds"  # -0.5 points


def test_no_crossover_and_a_gap_that_grows():
    pts = [{"size": 500, "gap": 0.01, "se": 0.001}, {"size": 5000, "gap": 0.05, "se": 0.001}]
    assert ds.crossover(pts) is None
    ev = {"gaps": {"best ViT − best ResNet": pts}}
    assert ds.gap_shrinks(ev)[0] == "does not hold"
