"""The `flexdraft` command on the embedded default, run as a user would (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import random_adapter, tiny_target

from flexdraft_sgl.core.policy import ForwardCostTable
from flexdraft_sgl.default_model import default_model_dir, prepare_default_model


def flexdraft(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "flexdraft_sgl.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_prepare_default_is_idempotent(smollm2):
    path = prepare_default_model()
    weights = path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert flexdraft("prepare-default").stdout.strip() == str(default_model_dir())
    assert prepare_default_model() == path and weights.stat().st_mtime_ns == before  # not converted again


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_generate_reports_tau_and_speedup_and_matches_plain(smollm2, mode):
    out = flexdraft("generate", "What is 2+2?", "Name a colour.", "--mode", mode, "--max-new-tokens", "24", "--json")
    report = json.loads(out.stdout)
    assert "UNTRAINED" not in out.stderr  # the shipped adapter
    summary = report["summary"]
    assert summary["identical_to_plain"] == [True, True]
    assert summary["speedup"] > 0 and summary["plain_tokens_per_second"] > 0
    for r in report["requests"]:
        assert 1 <= r["tokens"] <= 24 and r["tau"] >= 1.0 and r["forwards"] >= 1 and r["deep_rows"] > 0
    assert sum(r["mean_accepted"] for r in report["requests"]) > 0  # trained drafts get accepted


def test_generate_with_a_saved_adapter_and_cost_table(smollm2, tmp_path):
    flexdraft("init-adapter", "--out", str(tmp_path / "ad"), "--tuned-depth", "2", "--block-size", "4",
              "--rank", "8")
    flexdraft("measure-costs", "--out", str(tmp_path / "costs.json"), "--rows", "1,8", "--repeats", "1")
    table = ForwardCostTable.load(tmp_path / "costs.json")
    assert table.rows == (1, 8) and all(s > 0 for s in table.seconds)
    out = flexdraft("generate", "Hi", "--adapter", str(tmp_path / "ad"), "--mode", "flex", "--cost-table",
                    str(tmp_path / "costs.json"), "--max-new-tokens", "8")
    assert "speed-up" in out.stdout and "identical to plain decoding" in out.stdout


def test_mismatched_adapter_and_bad_flags_fail_clearly(smollm2, tmp_path):
    random_adapter(tiny_target("llama")).save(tmp_path / "tiny")
    out = flexdraft("generate", "Hi", "--adapter", str(tmp_path / "tiny"), check=False)
    assert out.returncode == 2
    assert "different target" in out.stderr and "num_layers: adapter 4, target 30" in out.stderr
    out = flexdraft("generate", "--mode", "tree", check=False)
    assert out.returncode == 2 and "invalid choice: 'tree'" in out.stderr
    out = flexdraft("generate", "Hi", "--adapter", str(tmp_path / "missing"), check=False)
    assert out.returncode == 2 and "does not exist" in out.stderr


def test_eval_refuses_unknown_configurations_and_rewrites_its_report(smollm2, tmp_path):
    refused = flexdraft("eval", "--out", str(tmp_path), "--configs", "plain,eagle3", check=False)
    assert refused.returncode == 2 and "eagle3" in refused.stderr and "--eagle3-draft" in refused.stderr

    from dataclasses import asdict

    from flexdraft_sgl.eval.serving import RESULTS, Point

    points = [Point(name, "mt-bench", 0.0, c, tokens_per_second=tps, tpot_ms=10.0, accept_length=acc,
                    requests=2, output_tokens=8, seconds=1.0, outputs=[[1, 2], [3, 4]])
              for name, acc, tps in (("plain", None, 10.0), ("flexdraft-flex", 1.5, 12.0), ("ngram", 1.2, 8.0))
              for c in (1, 2)]
    (tmp_path / RESULTS).write_text("".join(json.dumps(asdict(p)) + "\n" for p in points))
    out = flexdraft("eval", "--out", str(tmp_path), "--configs", "flexdraft-flex,ngram", "--report-only")
    report = (tmp_path / "report.md").read_text()
    assert "| flexdraft-flex | 12.0 (1.20x) | 12.0 (1.20x) |" in report and report in out.stdout + "\n"
    assert "| fastest mode over plain, concurrency 1, temperature 0, mt-bench | >= 1.3x | 1.20x | no |" in report
    assert "| fastest mode over NGRAM, every point | >= 1x | 1.50x | yes |" in report
    assert "| fastest mode over EAGLE3, concurrency 1 | >= 0.9x | - | - |" in report  # not measured
    assert (tmp_path / "plot-mt-bench-T0.png").exists()
