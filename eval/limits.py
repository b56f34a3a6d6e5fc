"""The training study's summary table (`eval/limits.sh`): every run's budget, loss, held-out row acceptance and tau,
beside the no-network baselines on the same held-out states.

    python -m flexdraft_sgl.eval.limits --data DATA --out OUT     writes OUT/summary.md, summary.json and curves.png

A run is OUT/<name>/ (a `flexdraft train` folder) measured in OUT/tau-<name>/ (`flexdraft eval-tau`); its snapshots
OUT/<name>/snapshots/step-N/ measured in OUT/tau-<name>-step-N/ give curves against training length.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

from ..train.data import load_samples


def next_token_baselines(train_answers: list[list[int]], held_out_answers: list[list[int]]) -> dict:
    """Row 1 drafts answer[P+1] from the state whose bonus is answer[P]. How often two networkless guesses get it:
    the most frequent successor of the bonus in the training answers (a bigram table; the most frequent token for a
    bonus never seen), and the most frequent token."""
    successors: dict[int, Counter] = defaultdict(Counter)
    frequency = Counter()
    for answer in train_answers:
        frequency.update(answer)
        for a, b in zip(answer, answer[1:]):
            successors[a][b] += 1
    top = frequency.most_common(1)[0][0]
    bigram = {a: c.most_common(1)[0][0] for a, c in successors.items()}
    states = [(a, b) for answer in held_out_answers for a, b in zip(answer, answer[1:])]
    return {"states": len(states),
            "bigram": sum(bigram.get(a, top) == b for a, b in states) / len(states),
            "most_frequent": sum(top == b for _, b in states) / len(states)}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def measured(tau_dir: Path, block_size: int = 8) -> dict | None:
    """Held-out ShareGPT figures of one eval-tau folder: tau (all B-1 drafts verified) and row acceptance."""
    taus = {(r["mode"], r["calibration"]): r["tau"] for r in _read_jsonl(tau_dir / "tau.jsonl")
            if r["dataset"] == "sharegpt" and r["block_size"] == block_size and r["verify"] == "full"}
    rows = {r["calibration"]: r["row_acceptance"] for r in _read_jsonl(tau_dir / "rows.jsonl")
            if r["dataset"] == "sharegpt" and r["block_size"] == block_size}
    if not taus or not rows:
        return None
    return {"row1_on": rows[True][0], "row1_off": rows[False][0], "row2_on": rows[True][1],
            "row3_on": rows[True][2], "tau_parallel": taus[("parallel", True)],
            "tau_sequential": taus[("sequential", True)]}


def run_records(out: Path) -> list[dict]:
    records = []
    for summary_path in sorted(out.glob("*/train_summary.json")):
        run = summary_path.parent
        summary = json.loads(summary_path.read_text())
        c = summary["config"]
        record = {"run": run.name, "N": c["tuned_depth"], "r": c["calibration_rank"], "form": c["calibration_form"],
                  "input": c["calibration_input"], "mask_init": c["mask_init"], "calibration": c["calibration"],
                  "decay": c["loss_decay"], "samples": summary["samples"],
                  "steps": c["steps"] + (c["calibration_steps"] if c["calibration"] == "second-stage" else 0),
                  "train_min": summary["train_seconds"] / 60, "loss": summary["final_loss_mean_last_100"],
                  "measured": measured(out / f"tau-{run.name}"), "curve": []}
        # a resumed run logs the steps after its last checkpoint again: the later line of a step is the one kept
        loss_at = {r["step"]: r["loss"] for r in _read_jsonl(run / "log.jsonl")}
        for snapshot in sorted((run / "snapshots").glob("step-*")):
            step = int(snapshot.name.split("-")[1])
            losses = [loss for s, loss in loss_at.items() if step - 100 < s <= step]
            record["curve"].append({"step": step, "loss": sum(losses) / len(losses) if losses else None,
                                    "measured": measured(out / f"tau-{run.name}-{snapshot.name}")})
        records.append(record)
    return records


def markdown(records: list[dict], baselines: dict) -> str:
    lines = ["| run | N | r | form | input | mask start | calibration | decay | samples | steps | train min | loss | "
             "row 1 on | row 1 off | row 2 on | row 3 on | tau par | tau seq |",
             "|---" * 18 + "|"]
    for r in records:
        m = r["measured"] or {}
        cells = [r["run"], r["N"], r["r"], r["form"], r["input"], r["mask_init"], r["calibration"], r["decay"],
                 r["samples"], r["steps"], f"{r['train_min']:.0f}", f"{r['loss']:.3f}"]
        cells += [f"{m[k]:.3f}" if k in m else "-" for k in
                  ("row1_on", "row1_off", "row2_on", "row3_on", "tau_parallel", "tau_sequential")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", f"Baselines on the same {baselines['states']:,} held-out states, no network: the bonus's most "
              f"frequent successor in the training answers (bigram) {baselines['bigram']:.3f}; the most frequent "
              f"token {baselines['most_frequent']:.3f}."]
    for r in records:
        if r["curve"]:
            lines += ["", f"Curve of `{r['run']}` against training steps:", "",
                      "| step | loss (mean of the 100 steps before) | row 1 on | row 1 off | row 2 on | tau par | "
                      "tau seq |", "|---|---|---|---|---|---|---|"]
            for point in r["curve"]:
                m = point["measured"] or {}
                lines.append(f"| {point['step']} | {point['loss']:.3f} | " + " | ".join(
                    f"{m[k]:.3f}" if k in m else "-"
                    for k in ("row1_on", "row1_off", "row2_on", "tau_parallel", "tau_sequential")) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(records: list[dict], path: Path) -> Path | None:
    """curves.png: each run's training loss and held-out row-1 acceptance (calibration on and off) against steps."""
    runs = [r for r in records if r["curve"]]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_row) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        points = [p for p in r["curve"] if p["loss"] is not None]
        line, = ax_loss.plot([p["step"] for p in points], [p["loss"] for p in points], marker="o", label=r["run"])
        for key, style in (("row1_on", "-"), ("row1_off", "--")):
            measured_points = [(p["step"], p["measured"][key]) for p in r["curve"] if p["measured"]]
            if measured_points:
                ax_row.plot(*zip(*measured_points), style, marker="o", color=line.get_color(),
                            label=f"{r['run']}, calibration {key.removeprefix('row1_')}")
    ax_loss.set_ylabel("training loss (mean of the 100 steps before)")
    ax_row.set_ylabel("held-out ShareGPT row-1 acceptance")
    for ax in (ax_loss, ax_row):
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the training data folder (for the bigram baseline)")
    parser.add_argument("--out", required=True, help="the study folder of eval/limits.sh")
    args = parser.parse_args(argv)
    out = Path(args.out)
    held_out = next(out.glob("tau-*/plain-sharegpt-*.json"))
    baselines = next_token_baselines([s.response_ids for s in load_samples(args.data)],
                                     json.loads(held_out.read_text()))
    records = run_records(out)
    (out / "summary.json").write_text(json.dumps({"baselines": baselines, "runs": records}, indent=2))
    (out / "summary.md").write_text(markdown(records, baselines))
    plot_curves(records, out / "curves.png")
    print(markdown(records, baselines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
