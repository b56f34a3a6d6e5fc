"""The step profile's section timer (`sglang/profile.py`) and its report (`eval/step_profile.py`), on a fake clock and
synthetic profile lines: what is measured, not how long anything takes."""

from __future__ import annotations

import json

import pytest

from flexdraft_sgl.eval.step_profile import PARTS, markdown_tables, steady, summarize
from flexdraft_sgl.sglang.profile import ENV, OFF, StepProfile, step_profile


class FakeClock:
    """Advances by the next of `ticks` at each reading, so every interval is known."""

    def __init__(self, *ticks: float):
        self.now, self.ticks = 0.0, list(ticks)

    def __call__(self) -> float:
        self.now += self.ticks.pop(0) if self.ticks else 0.0
        return self.now


def test_sections_nest_hold_their_own_time_and_add_up_to_the_step(tmp_path):
    path = tmp_path / "profile.jsonl"
    # readings: step start, enter a, enter a/b, leave a/b, leave a, enter c, leave c, step end
    profile = StepProfile(path, clock=FakeClock(0, 1, 2, 4, 8, 16, 32, 64))
    synced = []
    profile.synchronize = lambda: synced.append(1)
    with profile.section("outside"):  # no step running: untimed, nothing written
        pass
    assert not path.exists()
    with profile.step(bs=8):
        with profile.section("a"):
            with profile.section("b"):
                pass
        profile.note(mode="parallel", width=4)
        with profile.section("c"):
            pass
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert line["bs"] == 8 and line["mode"] == "parallel" and line["width"] == 4
    assert line["sections"] == {"other": 1 + 16 + 64, "a": 2 + 8, "a/b": 4, "c": 32}
    assert sum(line["sections"].values()) == line["total"] == 127
    assert len(synced) == 8  # a device sync before every clock reading


def test_a_failed_step_writes_nothing_and_the_next_one_starts_clean(tmp_path):
    path = tmp_path / "profile.jsonl"
    profile = StepProfile(path, clock=FakeClock(1, 1, 1, 1, 1, 1))
    with pytest.raises(ValueError):
        with profile.step(bs=1), profile.section("a"):
            raise ValueError
    with profile.step(bs=2):
        pass
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    assert line["bs"] == 2 and line["sections"] == {"other": 1}


def test_wrap_times_a_method_as_a_section(tmp_path):
    class Backend:
        def plan(self, x):
            return x + 1

    profile, backend = StepProfile(tmp_path / "p.jsonl", clock=FakeClock(0, 1, 2, 4, 8, 16)), Backend()
    profile.wrap(backend, "plan", "attn_metadata")
    with profile.step(bs=1), profile.section("forward"):
        assert backend.plan(1) == 2
    line = json.loads((tmp_path / "p.jsonl").read_text())
    assert line["sections"] == {"other": 1 + 16, "forward": 2 + 8, "forward/attn_metadata": 4}


def test_disabled_profiling_is_a_no_op(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV, raising=False)
    assert step_profile("cpu") is OFF
    assert OFF.step(bs=1) is OFF.section("a") is OFF.section("b")  # one shared no-op context manager
    with OFF.step(bs=1), OFF.section("a"):
        OFF.note(mode="parallel")

    class Backend:
        def plan(self):
            return 1

    backend = Backend()
    OFF.wrap(backend, "plan", "x")
    assert "plan" not in vars(backend)
    monkeypatch.setenv(ENV, str(tmp_path / "p.jsonl"))
    enabled = step_profile("cpu")
    assert isinstance(enabled, StepProfile) and enabled.synchronize is None  # no device to wait for on CPU


def _line(bs, total, **sections):
    return {"mode": "parallel", "bs": bs, "width": 4, "sections": sections, "total": total}


def test_report_averages_the_full_batch_steps_and_compares_with_a_plain_step():
    lines = [_line(3, 0.010, other=0.010), _line(4, 0.100, other=0.100),  # filling the batch
             _line(4, 0.020, **{"verify/forward": 0.012, "mask_block/layers": 0.006, "other": 0.002}),
             _line(4, 0.030, **{"verify/forward": 0.018, "mask_block/layers": 0.010, "other": 0.002}),
             _line(4, 0.040, **{"verify/forward": 0.020, "mask_block/layers": 0.014, "acceptance": 0.004,
                                "other": 0.002}),
             _line(2, 0.005, other=0.005)]  # draining
    full = steady(lines, 4, skip=1)
    assert [line["total"] for line in full] == [0.020, 0.030, 0.040]
    summary = summarize(full)
    assert summary["steps"] == 3 and summary["total"] == pytest.approx(0.030) and summary["median_total"] == 0.030
    assert summary["sections"]["verify/forward"] == pytest.approx(0.016666, rel=1e-3)
    assert summary["sections"]["acceptance"] == pytest.approx(0.004 / 3)  # absent from two steps: counted 0
    assert sum(summary["sections"].values()) == pytest.approx(summary["total"])
    assert summarize([]) == {"steps": 0, "sections": {}, "total": None, "median_total": None, "interval": None}
    assert summary["interval"] is None  # lines without starts (written before they were recorded)

    point = {"mode": "parallel", "width": 4, "bs": 4, "plain": 0.010, "tokens_per_step": 1.5, **summary}
    table = markdown_tables([point, {**point, "bs": 1, "plain": 0.005, "total": 0.010, "median_total": 0.008,
                                     "sections": {"verify/forward": 0.010}, "steps": 7, "tokens_per_step": None}])
    lines = table.splitlines()
    assert lines[0] == "### parallel, W = 4 (3 drafts verified per step)"
    assert lines[2] == "| part | bs 1 | bs 4 |"  # batch sizes ascending
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[4:]}
    assert rows[PARTS["verify/forward"]].endswith("| 10.00 ms (2.00) | 16.67 ms (1.67) |")
    assert rows[PARTS["mask_block/layers"]].endswith("| - | 10.00 ms (1.00) |")
    assert rows["**FLEXDRAFT step**"].endswith("| **10.00 ms (2.00)** | **30.00 ms (3.00)** |")
    assert rows["FLEXDRAFT step, median"].endswith("| 8.00 ms | 30.00 ms |")
    assert rows["plain SGLang step"].endswith("| 5.00 ms | 10.00 ms |")
    assert rows["tokens per step (these prompts)"].endswith("| - | 1.50 |")
    assert rows["full-batch steps averaged"].endswith("| 7 | 3 |")
    assert rows["FLEXDRAFT step to step (scheduler included)"].endswith("| - | - |")
    # parts in the order of a step
    order = [line.split(" | ")[0].strip("| ") for line in lines[4:8]]
    assert order == [PARTS["verify/forward"], PARTS["acceptance"], PARTS["mask_block/layers"], PARTS["other"]]


def test_step_to_step_interval_holds_the_scheduler_time_between_steps(tmp_path):
    """Starts 0, 0.05, 0.09, 0.15 with steps of 0.03: 0.05 from one start to the next, 0.02 of it outside the step."""
    lines = [{**_line(2, 0.03, other=0.03), "start": t} for t in (0.0, 0.05, 0.09, 0.15)]
    summary = summarize(lines)
    assert summary["interval"] == pytest.approx(0.05) and summary["total"] == pytest.approx(0.03)
    assert summarize(lines[:1])["interval"] is None  # one step: nothing to space

    point = {"mode": "plain", "width": 1, "bs": 2, "plain": 0.025, "plain_interval": 0.04, "tokens_per_step": 1.0,
             **summary}
    table = markdown_tables([point]).splitlines()
    assert table[0] == "### plain: flex allowed only plain steps (FLEXDRAFT_FLEX_MODES=plain), one row per request"
    rows = {line.split(" | ")[0].strip("| "): line for line in table[4:]}
    assert rows["FLEXDRAFT step to step (scheduler included)"].endswith("| 50.00 ms (1.25) |")
    assert rows["plain SGLang step to step"].endswith("| 40.00 ms |")

    # the profile records each step's start on its own clock
    profile = StepProfile(tmp_path / "p.jsonl", clock=FakeClock(5, 1, 3))
    with profile.step(bs=1):
        pass
    with profile.step(bs=1):
        pass
    starts = [json.loads(x)["start"] for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert starts == [5, 9]


def test_plain_baseline_ratios_are_within_a_set_of_servers():
    from flexdraft_sgl.eval.plain_baseline import markdown, summarize

    # Set 0 is a slow set of processes, set 1 a fast one; within each, flex-plain runs 10% above plain.
    bursts = []
    for set_, scale in ((0, 1.0), (1, 1.5)):
        for round_, noise in enumerate((1.0, 1.2, 0.9)):
            for server, speed in (("plain", 10.0), ("flex-plain", 11.0)):
                bursts.append({"set": set_, "round": round_, "bs": 8, "server": server, "tokens": 100,
                               "seconds": 100 / (speed * scale * noise), "step": 0.1 / (speed * scale)})
    rows = {(r["set"], r["server"]): r for r in summarize(bursts)["rows"]}
    assert rows[0, "plain"]["tokens_per_s"] == pytest.approx(10.0)  # the median round
    assert rows[1, "plain"]["tokens_per_s"] == pytest.approx(15.0)
    assert rows[0, "plain"]["tps_spread"] == pytest.approx((9.0, 12.0))
    assert rows[0, "flex-plain"]["vs_plain"] == pytest.approx(1.1)
    assert rows[1, "flex-plain"]["vs_plain"] == pytest.approx(1.1)
    assert rows[1, "plain"]["vs_plain"] == pytest.approx(1.0)
    text = markdown(summarize(bursts), ("plain", "flex-plain"))
    assert "### batch 8" in text and "| 1 | 15.0 (13.5-18.0) | 16.5" in text and "| 1.10 |" in text
