"""`flexdraft eval`'s harness against real SGLang servers on a tiny model: every point measured, FLEXDRAFT's greedy
output equal to plain decoding's, the report and plots written, and an interrupted run resumed without re-measuring
what it has."""

from __future__ import annotations

import dataclasses
import json

from conftest import random_adapter, random_prompts, tiny_target

from flexdraft_sgl.core.policy import ForwardCostTable
from flexdraft_sgl.eval.report import greedy_equal, markdown_report, speedup, targets, write_plots
from flexdraft_sgl.eval.serving import RESULTS, EvalPlan, Point, combine_rounds, load_points, run_eval, serve_configs


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
    assert "| fastest mode | flex | flex |" in report and "| over ngram |" in report and "over eagle3" not in report
    summary = {t["target"]: t for t in targets(points)}
    flex_worst = min(speedup(p, index) for p in points if p.config == "flexdraft-flex")
    assert summary["flex over plain, every point"]["measured"] == flex_worst
    assert summary["fastest mode over NGRAM, every point"]["measured"] == min(
        speedup(p, index, over="ngram") for p in points if p.config == "flexdraft-flex")
    assert summary["fastest mode over EAGLE3, concurrency 1"]["measured"] is None  # not measured: no verdict
    assert summary["fastest mode over EAGLE3, concurrency 1"]["met"] is None
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

    # A second round of two configurations at one point: fresh servers measure only those, and the combined point
    # holds both rounds' outputs, still equal to plain decoding's round by round.
    two = dataclasses.replace(plan, configs=(configs["plain"], configs["flexdraft-flex"]), temperatures=(0.0,),
                              concurrency=(1,), rounds=2)
    measured = run_eval(two, out, prompts, progress=False)
    assert len(measured) == 14 and sorted(p.config for p in measured if p.round == 1) == ["flexdraft-flex", "plain"]
    combined = {p.key: p for p in combine_rounds(measured)}
    assert len(combined) == 12
    flex_twice = combined[("flexdraft-flex", "toy", 0.0, 1)]
    assert flex_twice.rounds == 2 and len(flex_twice.outputs) == 4 and greedy_equal(flex_twice, combined) == 1.0
    assert "median of 2 rounds" in markdown_report(list(combined.values()))


def test_targets_hold_the_fastest_flexdraft_mode_against_each_rival():
    from flexdraft_sgl.eval.report import best_flexdraft
    from flexdraft_sgl.eval.serving import Point

    rates = {  # tokens/s at concurrency 1 and 8
        "plain": (10.0, 40.0), "plain-sync": (12.0, 36.0), "flexdraft-parallel": (18.0, 30.0),
        "flexdraft-sequential": (15.0, 44.0), "flexdraft-flex": (11.0, 42.0), "ngram": (9.0, 20.0),
        "eagle3": (20.0, 50.0)}
    points = [Point(name, "mt-bench", 0.0, c, tokens_per_second=r) for name, pair in rates.items()
              for c, r in zip((1, 8), pair)]
    index = {p.key: p for p in points}
    assert best_flexdraft(index, "mt-bench", 0, 1).config == "flexdraft-parallel"
    assert best_flexdraft(index, "mt-bench", 0, 8).config == "flexdraft-sequential"
    over_plain, flex, over_ngram, over_eagle3_loaded, over_eagle3_alone = targets(points)
    assert over_plain["measured"] == 18.0 / 12.0  # over the faster plain configuration
    assert flex["measured"] == 11.0 / 12.0 and flex["met"] is False
    assert over_ngram["measured"] == min(18.0 / 9.0, 44.0 / 20.0)
    assert over_eagle3_loaded["measured"] == 44.0 / 50.0 and over_eagle3_loaded["met"] is False
    assert over_eagle3_alone["measured"] == 18.0 / 20.0 and over_eagle3_alone["met"] is True
    report = markdown_report(points)
    assert "| fastest mode | parallel | sequential |" in report and "| over eagle3 | 0.90x | 0.88x |" in report


def test_combine_rounds_takes_medians_and_keeps_every_output():
    rounds = [Point("flexdraft-flex", "mt-bench", 0.0, 1, tokens_per_second=r, tpot_ms=t, ttft_ms=5.0,
                    accept_length=a, requests=1, output_tokens=n, seconds=n / r, outputs=[[i]], round=i)
              for i, (r, t, a, n) in enumerate([(10.0, 100.0, 2.0, 20), (30.0, 30.0, None, 30),
                                                (12.0, 80.0, 1.0, 10)])]
    plain = Point("plain", "mt-bench", 0.0, 1, tokens_per_second=11.0, outputs=[[0]])
    combined = {p.key: p for p in combine_rounds(rounds[::-1] + [plain])}
    flex = combined[rounds[0].key]
    assert (flex.tokens_per_second, flex.tpot_ms, flex.rounds, flex.round) == (12.0, 80.0, 3, 0)
    assert flex.spread == round((30.0 - 10.0) / 12.0, 4)
    assert flex.accept_length == round(30 / (10 + 10), 4)  # over the rounds that report steps
    assert flex.outputs == [[0], [1], [2]] and flex.output_tokens == 60 and flex.requests == 3
    assert combined[plain.key] == dataclasses.replace(plain, rounds=1, spread=0.0)
    report = markdown_report(list(combined.values()))
    assert "median of 3 rounds" in report and "12.0 (1.09x, ±83%)" in report and "11.0 (1.00x)" in report
