"""Smoke test of benchmarks/recon_resnet.py: Recon on a ResNet with BatchNorm.

The whole pipeline (search, branching with per-task BatchNorm statistics,
retraining, the conflict metric and the report) at tiny sizes: a two-stage
ResNet of width 4-8, three steps, one seed, joint and Recon + joint only.
"""

import numpy as np
import pytest
from benchmark_scripts import load_benchmark


@pytest.fixture(scope="module")
def bench():
  return load_benchmark("recon_resnet")


def test_recon_resnet_quick(bench, tmp_path):
  pytest.importorskip("sklearn")
  runs = bench.main(["--quick", "--models", "resnet", "--methods", "joint",
                     "--no-controls", "--out", str(tmp_path),
                     "--raw", str(tmp_path / "raw.pkl")])
  (run,) = runs
  layers = run["all_layers"]
  # stem conv-BN, block 0 (4 layers), block 1 with its shortcut (6), fc
  assert len(layers) == 13 and layers[1].endswith("_bn")
  assert run["k"] == round(13 * 25 / 41) == len(run["chosen"])
  assert set(run["results"]) == {"joint", "recon+joint"}
  for result in run["results"].values():
    assert np.all(np.isfinite(result["acc"]))
    assert result["logs"][0]["whole"].shape == (3,)
  assert run["results"]["recon+joint"]["params"] > \
      run["results"]["joint"]["params"]
  report = (tmp_path / "recon_resnet.md").read_text()
  assert "reduction vs joint" in report and "Δm vs single-task" in report
  assert (tmp_path / "recon_resnet_scores.png").exists()
  # the report re-renders from the raw logs
  bench.main(["--quick", "--models", "resnet", "--out", str(tmp_path),
              "--from-raw", str(tmp_path / "raw.pkl")])
