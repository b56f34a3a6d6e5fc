"""`flexdraft eval`'s harness against real SGLang servers on a tiny model: every point measured, FLEXDRAFT's greedy
output equal to plain decoding's, the report and plots written, and an interrupted run resumed without re-measuring
what it has."""

from __future__ import annotations

import dataclasses
import json

from conftest import random_adapter, random_prompts, tiny_target

from flexdraft_sgl.core.policy import ForwardCostTable
from flexdraft_sgl.eval.report import greedy_equal, markdown_report, speedup, targets, write_plots
from flexdraft_sgl.eval.serving import RESULTS, EvalPlan, load_points, run_eval, serve_configs


def test_eval_measures_every_point_reports_and_resumes(tmp_path):
    model = tiny_target("llama", vocab=16, seed=3)
    model.save_pretrained(tmp_path / "model")
    random_adapter(model, tuned_depth=2, block_size=6, seed=5).save(tmp_path / "adapter")
    table = tmp_path / "cost.json"
    table.write_text(ForwardCostTable((1, 6, 106), (1.0, 1.0, 101.0)).to_json())
    configs = serve_configs(str(tmp_path / "adapter"), cost_table=str(table), ngram_width=4)
    plan = EvalPlan(str(tmp_path / "model"), (configs["plain"], configs["flexdraft-flex"], configs["ngram"]),
                    ("toy",), temperatures=(0.0, 1.0), concurrency=(1, 4), max_new_tokens=16,
                    server_args=("--skip-tokenizer-init",))
    prompts = {"toy": random_prompts(8, 16, seed=4, max_len=12)}
    out = tmp_path / "eval"
    points = run_eval(plan, out, prompts, progress=False)

    assert len(points) == 3 * 2 * 2 and len({p.key for p in points}) == 12
    index = {p.key: p for p in points}
    for p in points:
        assert p.requests == 2 * p.concurrency == len(p.outputs)
        assert p.output_tokens == sum(map(len, p.outputs)) <= 16 * p.requests
        assert p.tokens_per_second > 0 and p.tpot_ms > 0 and p.ttft_ms > 0
        assert speedup(p, index) is not None
        if p.temperature == 0:
            assert greedy_equal(p, index) == 1.0, p.config  # lossless: the same tokens as plain decoding
    flex_alone = index[("flexdraft-flex", "toy", 0.0, 1)]
    assert flex_alone.accept_length and flex_alone.accept_length > 1.0  # drafts were accepted
    assert index[("plain", "toy", 0.0, 1)].accept_length is None

    # "Over plain" means over the faster plain configuration measured at the point.
    flex_point = index[("flexdraft-flex", "toy", 0.0, 4)]
    plain_point = index[("plain", "toy", 0.0, 4)]
    faster_plain = dataclasses.replace(plain_point, config="plain-sync",
                                       tokens_per_second=2 * plain_point.tokens_per_second)
    both = {**index, faster_plain.key: faster_plain}
    assert speedup(flex_point, both) == flex_point.tokens_per_second / faster_plain.tokens_per_second
    assert speedup(plain_point, both) == 0.5 and speedup(flex_point, both, over="ngram") == speedup(flex_point, index,
                                                                                               over="ngram")

    report = markdown_report(points, "header")
    assert "### toy, temperature 0" in report and "| flexdraft-flex |" in report and "ngram 100%" in report
    summary = targets(points)
    assert summary["speedup_at_concurrency_1"] is not None and summary["lowest_ratio_to_ngram"] is not None
    plots = write_plots(points, out)
    assert [p.name for p in plots] == ["plot-toy-T0.png", "plot-toy-T1.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in plots)

    # Interrupted while writing its last point: that point (and only it) is measured again.
    lines = (out / RESULTS).read_text().splitlines()
    (out / RESULTS).write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    again = run_eval(plan, out, prompts, progress=False)
    assert len(again) == 12
    assert (out / RESULTS).read_text().splitlines()[: len(lines) - 1] == lines[:-1]
    assert json.loads((out / RESULTS).read_text().splitlines()[-1])["config"] == json.loads(lines[-1])["config"]
    assert len(load_points(out)) == 12
