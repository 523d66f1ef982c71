"""experiments.fewshot_study on synthetic sweep rows whose errors follow known laws."""

import csv
import json

import pytest

from experiments import fewshot_study
from experiments.scaling_curves import ReportError

PARAMS = {"s": 10_000, "m": 40_000, "l": 160_000, "xl": 640_000}
EXAMPLES = (15_360, 30_720, 61_440, 122_880, 245_760)
GFLOPS = {m: 2 * p * 17 / 1e9 for m, p in PARAMS.items()}  # forward FLOPs per example ~ 2 x params x tokens


def law(c, a=40.0, b=0.3, c0=0.08, d=0.0):
    return a * (c + d) ** (-b) + c0


def write(path, fewshot_error):
    fields = ["point", "status", "family", "model", "params", "examples_seen", "gflops_per_example", "train_flops",
              "test_error", "accuracy", "fewshot/mnist/10shot", "branch_from_point"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for m, p in PARAMS.items():
            for i, ex in enumerate(EXAMPLES):
                flops = 3 * GFLOPS[m] * 1e9 * ex
                up = law(flops)
                w.writerow(dict(point=f"{m}_{ex}", status="ok", family="vit", model=m, params=p, examples_seen=ex,
                                gflops_per_example=GFLOPS[m], train_flops=flops, test_error=up, accuracy=1 - up,
                                **{"fewshot/mnist/10shot": 1 - fewshot_error(m, flops)},
                                branch_from_point="" if i == len(EXAMPLES) - 1 else f"{m}_{EXAMPLES[-1]}"))


def test_errors_on_the_law_are_fitted_and_the_verdicts_hold(tmp_path):
    csv_path = tmp_path / "results.csv"
    write(csv_path, lambda m, flops: law(flops, a=80.0, b=0.25, c0=0.2))
    data = fewshot_study.make_report([str(csv_path)], str(tmp_path / "out"), bootstrap=20)
    up, fs = data["curves"]["upstream"], data["curves"]["fewshot_mnist"]
    assert up["law"]["verdict"] == "holds" and fs["law"]["verdict"] == "holds"
    assert up["fit"]["b"] == pytest.approx(0.3, rel=0.05) and up["fit"]["c"] == pytest.approx(0.08, abs=0.005)
    assert fs["fit"]["b"] == pytest.approx(0.25, rel=0.05) and fs["fit"]["c"] == pytest.approx(0.2, abs=0.01)
    # At equal examples seen a larger model has more compute, so a lower error on a decreasing law: 5 x 6 pairs.
    assert fs["sample_efficiency"]["verdict"] == "holds"
    assert "30 of 30" in fs["sample_efficiency"]["numbers"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "xl (branch)" in report and "10-shot linear transfer error, mnist" in report
    assert json.loads((tmp_path / "out" / "fit.json").read_text())["points"] == 20
    assert (tmp_path / "out" / "fewshot_mnist.png").exists()


def test_larger_models_that_transfer_worse_fail_the_sample_efficiency_verdict(tmp_path):
    rank = {m: i for i, m in enumerate(PARAMS)}
    csv_path = tmp_path / "results.csv"
    write(csv_path, lambda m, flops: 0.3 + 0.05 * rank[m] - 1e-9 * flops ** 0.5)
    data = fewshot_study.make_report([str(csv_path)], str(tmp_path / "out"), bootstrap=5)
    eff = data["curves"]["fewshot_mnist"]["sample_efficiency"]
    assert eff["verdict"] == "does not hold" and eff["numbers"].startswith("the larger model has the lower error in 0")


def test_a_sweep_without_fewshot_columns_is_one_clear_error(tmp_path):
    csv_path = tmp_path / "results.csv"
    write(csv_path, lambda m, flops: 0.5)
    with pytest.raises(ReportError, match=r"no column fewshot/<dataset>/5shot.*--shots"):
        fewshot_study.make_report([str(csv_path)], str(tmp_path / "out"), shots=5)
    assert fewshot_study.main(["--results", str(csv_path), "--out", str(tmp_path / "o"), "--shots", "5"]) == 2
