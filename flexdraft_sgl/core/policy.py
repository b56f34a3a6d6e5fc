"""The flex decision: parallel or sequential mode, and how many drafts to verify, for the next step of a batch.

Both modes start from the same state (each request holds a bonus token and calibrated drafts) and return to it:
  parallel     one forward: [c0, d1..dv] at full depth + (v+1) mask blocks of B rows in the final N layers;
               emits accepted+1 tokens.
  sequential   a verify forward [c0, d1..dv] at full depth, then a draft forward (the new bonus at full depth + one
               mask block); emits accepted+1 tokens, plus the one exact token the draft forward predicts.
A forward's time comes from a cost table measured on the machine, as a function of rows processed at full depth;
a deep-only row counts as tuned_depth/num_layers of one. The expected accepted length comes from draft confidence
(`confidence.expected_tokens`). The plan with the higher predicted tokens per second wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from torch import Tensor

from .confidence import expected_tokens, verify_lengths


class Mode(str, Enum):
    PARALLEL = "parallel"
    SEQUENTIAL = "sequential"


@dataclass(frozen=True)
class ForwardCostTable:
    """Seconds of one target forward against full-depth rows in it (all requests together), ascending rows;
    interpolated linearly inside, extrapolated from the last two points beyond."""

    rows: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self):
        if len(self.rows) != len(self.seconds) or len(self.rows) < 2:
            raise ValueError("a cost table needs at least two (rows, seconds) points of equal count")
        if any(b <= a for a, b in zip(self.rows, self.rows[1:])):
            raise ValueError("cost table rows must be strictly increasing")

    def seconds_for(self, rows: float) -> float:
        xs, ys = self.rows, self.seconds
        i = 1
        while i < len(xs) - 1 and rows > xs[i]:
            i += 1
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(y0 + (y1 - y0) * (rows - x0) / (x1 - x0), 1e-9)

    def to_json(self) -> str:
        return json.dumps({"rows": list(self.rows), "seconds": list(self.seconds)})

    @classmethod
    def from_json(cls, text: str) -> ForwardCostTable:
        data = json.loads(text)
        return cls(tuple(int(r) for r in data["rows"]), tuple(float(s) for s in data["seconds"]))

    @classmethod
    def load(cls, path: str | Path) -> ForwardCostTable:
        return cls.from_json(Path(path).read_text())


@dataclass(frozen=True)
class StepPlan:
    mode: Mode
    verify_lens: Tensor  # [bs]
    tokens_per_second: float  # predicted for the chosen mode
    predicted: dict  # mode -> predicted tokens per second, for every mode considered


def plan_step(
    draft_top_probs: Tensor,
    cost: ForwardCostTable,
    *,
    block_size: int,
    tuned_depth: int,
    num_layers: int,
    rule: str = "cumulative_product",
    threshold: float = 0.01,
    modes: tuple[Mode, ...] = (Mode.PARALLEL, Mode.SEQUENTIAL),
) -> StepPlan:
    """Choose the mode and per-request verify lengths. draft_top_probs: [bs, B-1] top probability of each draft."""
    bs = draft_top_probs.shape[0]
    verify = verify_lengths(draft_top_probs, rule, threshold, max_len=block_size - 1)
    tokens = float(expected_tokens(draft_top_probs, verify).sum())
    full_rows = float((verify + 1).sum())
    deep_weight = tuned_depth / num_layers
    seconds = {
        Mode.PARALLEL: cost.seconds_for(full_rows * (1 + block_size * deep_weight)),
        Mode.SEQUENTIAL: cost.seconds_for(full_rows) + cost.seconds_for(bs * (1 + block_size * deep_weight)),
    }
    emitted = {Mode.PARALLEL: tokens, Mode.SEQUENTIAL: tokens + bs}
    predicted = {m: emitted[m] / seconds[m] for m in modes}
    best = max(modes, key=lambda m: predicted[m])
    return StepPlan(best, verify, predicted[best], predicted)


def plain_tokens_per_second(batch_size: int, cost: ForwardCostTable) -> float:
    """Plain decoding's predicted rate on the same table, for comparison."""
    return batch_size / cost.seconds_for(batch_size)


def default_cost_table() -> ForwardCostTable:
    """A memory-bound stand-in for when nothing was measured: flat up to 64 rows, then linear."""
    return ForwardCostTable((1, 64, 4096), (1.0, 1.0, 64.0))

