"""The report of a `flexdraft eval` run: markdown tables and PNG plots, every ratio against plain decoding's point of
the same run (same dataset, temperature and concurrency). Every function takes one point per key: the rounds of a
run combined by `serving.combine_rounds`."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .serving import Point

BASELINE = "plain"
# Plain SGLang's configurations (serving.serve_configs): a speed-up "over plain" is over the fastest of them measured
# at the same point, so no speed-up is measured against the slower plain configuration.
PLAINS = ("plain", "plain-sync")
FLEXDRAFT_MODES = ("flexdraft-parallel", "flexdraft-sequential", "flexdraft-flex")
# The speculative baselines FLEXDRAFT's best mode is held against, point by point.
RIVALS = ("ngram", "eagle3", "dflash")


def _by_key(points: list[Point]) -> dict[tuple, Point]:
    return {p.key: p for p in points}


def speedup(point: Point, index: dict[tuple, Point], over: str = BASELINE) -> float | None:
    """Tokens per second over another configuration's at the same point (None when it was not measured); over
    BASELINE: over the best plain configuration's."""
    names = PLAINS if over == BASELINE else (over,)
    rates = [other.tokens_per_second for name in names
             if (other := index.get((name, point.dataset, point.temperature, point.concurrency)))
             and other.tokens_per_second]
    return point.tokens_per_second / max(rates) if rates else None


def best_flexdraft(index: dict[tuple, Point], dataset: str, temperature: float, concurrency: int) -> Point | None:
    """FLEXDRAFT's fastest mode at a point (the mode a deployment would pick for that load)."""
    modes = [p for name in FLEXDRAFT_MODES if (p := index.get((name, dataset, float(temperature), int(concurrency))))]
    return max(modes, key=lambda p: p.tokens_per_second, default=None)


def greedy_equal(point: Point, index: dict[tuple, Point]) -> float | None:
    """At temperature 0: the fraction of requests whose output ids equal plain decoding's (None otherwise)."""
    plain = index.get((BASELINE, point.dataset, point.temperature, point.concurrency))
    if point.temperature != 0 or plain is None or len(plain.outputs) != len(point.outputs):
        return None
    return sum(a == b for a, b in zip(point.outputs, plain.outputs)) / max(len(point.outputs), 1)


def _groups(points: list[Point]) -> dict[tuple[str, float], list[Point]]:
    groups = defaultdict(list)
    for p in points:
        groups[(p.dataset, p.temperature)].append(p)
    return dict(sorted(groups.items()))


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _grid(index: dict, configs: list[str], dataset: str, temperature: float, concurrency: list[int], cell) -> list[str]:
    """A markdown table, one row per configuration and one column per concurrency; cell(point) fills it."""
    lines = ["| config | " + " | ".join(f"c={c}" for c in concurrency) + " |",
             "|" + "|".join(["---"] * (len(concurrency) + 1)) + "|"]
    for name in configs:
        points = [index.get((name, dataset, temperature, c)) for c in concurrency]
        lines.append(f"| {name} | " + " | ".join("-" if p is None else cell(p) for p in points) + " |")
    return lines


def markdown_report(points: list[Point], header: str = "") -> str:
    """Per dataset and temperature: tokens/s with the speed-up over plain, accept length, TPOT, and greedy equality."""
    index = _by_key(points)
    lines = [header, ""] if header else []
    for (dataset, temperature), group in _groups(points).items():
        concurrency = sorted({p.concurrency for p in group})
        configs = list(dict.fromkeys(p.config for p in group))
        rounds = max(p.rounds for p in group)
        rates = ("Output tokens/s (speed-up over the faster plain configuration in the same run):" if rounds == 1 else
                 f"Output tokens/s, median of {rounds} rounds (speed-up over the faster plain configuration; "
                 "spread of the rounds, (max - min) / median):")
        lines += [f"### {dataset}, temperature {temperature:g}", "", rates, ""]
        lines += _grid(index, configs, dataset, temperature, concurrency,
                       lambda p: f"{p.tokens_per_second:.1f} ({_fmt(speedup(p, index), '.2f')}x"
                                 + (f", ±{p.spread / 2:.0%})" if p.rounds > 1 else ")"))
        lines += ["", "Accept length (tokens per verify step) / mean TPOT ms:", ""]
        lines += _grid(index, configs, dataset, temperature, concurrency,
                       lambda p: f"{_fmt(p.accept_length, '.2f')} / {p.tpot_ms:.1f}")
        best = [(c, b) for c in concurrency if (b := best_flexdraft(index, dataset, temperature, c))]
        if best:
            against = [BASELINE] + [r for r in RIVALS if r in configs]
            lines += ["", "FLEXDRAFT's fastest mode at each point, and its tokens/s over plain and each rival:", "",
                      "| | " + " | ".join(f"c={c}" for c, _ in best) + " |",
                      "|" + "|".join(["---"] * (len(best) + 1)) + "|",
                      "| fastest mode | " + " | ".join(b.config.removeprefix("flexdraft-") for _, b in best) + " |"]
            lines += [f"| over {name} | " + " | ".join(_fmt(speedup(b, index, over=name), '.2f') + "x"
                                                      for _, b in best) + " |" for name in against]
        if temperature == 0:
            shares = []
            for name in (n for n in configs if n != BASELINE):
                equal = [e for p in group if p.config == name and (e := greedy_equal(p, index)) is not None]
                shares.append(f"{name} {sum(equal) / len(equal):.0%}" if equal else f"{name} -")
            lines += ["", "Greedy output equal to plain decoding: " + ", ".join(shares)]
        lines.append("")
    return "\n".join(lines)


def targets(points: list[Point], dataset: str = "mt-bench") -> list[dict]:
    """The serving targets (issues 13 and 14), each with the worst measured value over the points it covers:
    FLEXDRAFT's fastest mode over plain at concurrency 1 and temperature 0 on `dataset` (every dataset when it is
    absent), flex over plain everywhere, the fastest mode over NGRAM everywhere and over EAGLE3 at concurrency >= 8
    and at 1. A target whose configurations were not measured reads None."""
    index = _by_key(points)
    keys = sorted({p.key[1:] for p in points})
    if dataset not in {k[0] for k in keys}:
        dataset = None

    def worst(values):
        values = [v for v in values if v is not None]
        return min(values) if values else None

    def best_over(over, keep):
        return worst(speedup(b, index, over=over) for k in keys if keep(*k) and (b := best_flexdraft(index, *k)))

    flex = [p for p in points if p.config == "flexdraft-flex"]
    rows = [("fastest mode over plain, concurrency 1, temperature 0" + (f", {dataset}" if dataset else ""), 1.3,
             best_over(BASELINE, lambda d, t, c: c == 1 and t == 0 and dataset in (None, d))),
            ("flex over plain, every point", 0.95, worst(speedup(p, index) for p in flex)),
            ("fastest mode over NGRAM, every point", 1.0, best_over("ngram", lambda d, t, c: True)),
            ("fastest mode over EAGLE3, concurrency >= 8", 1.0, best_over("eagle3", lambda d, t, c: c >= 8)),
            ("fastest mode over EAGLE3, concurrency 1", 0.9, best_over("eagle3", lambda d, t, c: c == 1))]
    return [{"target": name, "goal": goal, "measured": value, "met": None if value is None else value >= goal}
            for name, goal, value in rows]


def targets_table(points: list[Point]) -> list[str]:
    lines = ["| target | goal | measured (worst point) | met |", "|---|---|---|---|"]
    for t in targets(points):
        met = "-" if t["met"] is None else ("yes" if t["met"] else "no")
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f}x"
        lines.append(f"| {t['target']} | >= {t['goal']:g}x | {measured} | {met} |")
    return lines


def write_plots(points: list[Point], out: str | Path) -> list[Path]:
    """One PNG per dataset and temperature: tokens/s and speed-up over plain against concurrency, a line per
    configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index, written = _by_key(points), []
    for (dataset, temperature), group in _groups(points).items():
        fig, (ax_tps, ax_speed) = plt.subplots(1, 2, figsize=(11, 4))
        for name in dict.fromkeys(p.config for p in group):
            mine = sorted((p for p in group if p.config == name), key=lambda p: p.concurrency)
            xs = [p.concurrency for p in mine]
            ax_tps.plot(xs, [p.tokens_per_second for p in mine], marker="o", label=name)
            speed = [(p.concurrency, s) for p in mine if (s := speedup(p, index)) is not None]
            if speed:
                ax_speed.plot(*zip(*speed), marker="o", label=name)
        for ax, label in ((ax_tps, "output tokens/s"), (ax_speed, "speed-up over plain")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(label)
            ax.grid(True, alpha=0.3)
        ax_speed.axhline(1.0, color="gray", linewidth=1)
        ax_tps.legend(fontsize=8)
        fig.suptitle(f"{dataset}, temperature {temperature:g}")
        fig.tight_layout()
        path = Path(out) / f"plot-{dataset}-T{temperature:g}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
