"""scripts/gpu_check.py without a GPU: the --small run records every check (its results, or "skipped: no CUDA" for
what needs a GPU), and the static model it captures on a GPU is checked here eagerly: its FlexDraft step equals the
spec's (core.layout + core.masks), and its greedy output equals plain greedy decoding of the same model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
CHECKS = ("calibration", "cost_table", "cuda_graphs", "flashinfer")
NO_CUDA = "skipped: no CUDA"


def run_script(out: Path, *args: str) -> subprocess.CompletedProcess:
    # No GPU even where one exists: this is the CPU path; one thread, as the machine is shared.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--out", str(out), *args], env=env, cwd=out,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    run_script(out)
    return json.loads((out / "results.json").read_text()), out


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_every_check_has_results_or_a_no_cuda_reason(small_run):
    data, out = small_run
    assert set(data["checks"]) == set(CHECKS)
    for name, check in data["checks"].items():
        assert check["status"] in ("ok", "partial", "skipped"), (name, check.get("error"))
        assert check["results"] or check.get("reason") == NO_CUDA, name
        assert all(why == NO_CUDA for why in check.get("skipped", {}).values()), name
    assert data["checks"]["flashinfer"]["status"] == "skipped"
    assert "triton" in data["checks"]["calibration"]["skipped"]
    assert data["checks"]["calibration"]["results"]  # the reference still ran
    assert data["checks"]["cost_table"]["results"]["plan_decisions"]["rows"]
    # a cost table is only ever written from measurements
    assert not (out / "cost_table.json").exists()
    assert (out / "summary.md").read_text().startswith("# FlexDraft GPU check")
    assert data["meta"]["heavy_modules_imported"] == []  # no SGLang, transformers or FlashInfer


def test_static_step_matches_the_spec_and_is_lossless(small_run):
    data, _ = small_run
    results = data["checks"]["cuda_graphs"]["results"]
    spec = results["spec_small_fp32"]
    assert {k.split("-")[0] for k in spec} == {"parallel", "sequential"}
    assert all(v["exact"] for v in spec.values()), spec
    lossless = results["lossless_small_fp32"]
    assert all(v["lossless"] for v in lossless.values()), lossless
    assert all(v["accepted_max"] > 0 for k, v in lossless.items() if k.endswith("oracle"))  # multi-token steps ran
    keys = results["keys"]
    assert len(keys) == 2 * 3 * 2  # modes x verify tiers (1, 3, 7) x batch sizes (1, 3)
    assert all("error" not in v and v["eager_ms"] > 0 for v in keys.values())


def test_lossless_check_catches_a_lossy_step(gpu_check, monkeypatch):
    model = gpu_check.StaticLlama(gpu_check.SMALL, torch.device("cpu"), seed=3)
    with torch.no_grad():
        good = gpu_check.lossless_check(model, verify_lens=(3,), bs=2, steps=3, seed=3)
        assert all(v["lossless"] for v in good.values()), good
        accept_one_more = gpu_check.greedy_verify

        def lossy(drafts, target_argmax, verify_lens):
            accepted, _ = accept_one_more(drafts, target_argmax, verify_lens)
            accepted = (accepted + 1).clamp(max=verify_lens)
            return accepted, target_argmax.gather(1, accepted[:, None]).squeeze(1)

        monkeypatch.setattr(gpu_check, "greedy_verify", lossy)
        bad = gpu_check.lossless_check(model, verify_lens=(3,), bs=2, steps=3, seed=3)
    assert not any(v["lossless"] for v in bad.values()), bad


def test_an_exhausted_budget_still_writes_results(tmp_path):
    run_script(tmp_path, "--budget-s", "0", "--checks", "calibration,flashinfer")
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["checks"]) == {"calibration", "flashinfer"}
    assert all(c["status"] == "stopped" and "time budget" in c["reason"] for c in data["checks"].values())
