"""The flex decision: plain, parallel or sequential, and how many drafts to verify, for the next step of a batch.

Every mode starts from the same state (each request holds a bonus token and calibrated drafts) and returns to it:
  plain        one forward of the bonus at full depth; emits 1 token; keeps the drafts it has (no drafting).
  parallel     the verify forward [c0, d1..dv] at full depth, plus the mask block after the last accepted token in
               the final N layers; emits accepted+1 tokens.
  sequential   the verify forward, then a draft forward (the new bonus at full depth + one mask block); emits
               accepted+1 tokens, plus the one exact token the draft forward predicts.
Engines run parallel mode in one of two shapes (`fused_parallel`): the reference engine puts all v+1 hypothesis
blocks into the verify forward (one weight pass); the SGLang worker runs the verify forward, then the kept block alone
through the final N layers (a second, partial weight pass). A forward's time comes from a cost table measured on the
machine, against full-depth rows; a deep-only row inside a full-depth forward counts as tuned_depth/num_layers of
one, and a forward through the final N layers alone costs that fraction of a full forward of its rows, plus the LM
head's share of one (`head_share`: a draft row reads the whole head, and on memory-bound hardware the head's weights
are a large part of a step's traffic: about a fifth for SmolLM2-135M, where 4 of 30 layers are a tenth). The expected
accepted length comes from draft confidence (`confidence.expected_tokens`). The plan with the highest predicted
tokens per second wins; plain decoding is always a candidate, so the plan is never predicted slower than it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from torch import Tensor

from .confidence import expected_tokens, verify_lengths


class Mode(str, Enum):
    PLAIN = "plain"
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


# Rows a measured cost table holds: a plain step of one request up to a crowd's verify forward.
COST_TABLE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def cost_table_shapes(rows: Sequence[int], width: int) -> list[tuple[int, int]]:
    """(requests, rows per request) of the forward timed for each table entry: fewer rows than `width` as that many
    one-row requests (a plain step), more as requests of `width` rows (a verify step). Shapes that round to the same
    one are kept once."""
    shapes = []
    for r in rows:
        shape = (r, 1) if r < width else (-(-r // width), width)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def measure_cost_table(prepare: Callable[[int, int], Callable[[], None]], shapes: Sequence[tuple[int, int]],
                       repeats: int = 3, clock=time.perf_counter) -> ForwardCostTable:
    """Time a forward of each (requests, width) shape: `prepare(requests, width)` builds its inputs and returns the
    forward (which finishes its device work before returning); the median of `repeats` calls after a warm-up one."""
    seconds = {}
    for requests, width in shapes:
        forward = prepare(requests, width)
        times = []
        for _ in range(repeats + 1):
            started = clock()
            forward()
            times.append(clock() - started)
        seconds[requests * width] = statistics.median(times[1:])
    rows = sorted(seconds)
    return ForwardCostTable(tuple(rows), tuple(seconds[r] for r in rows))


@dataclass(frozen=True)
class StepPlan:
    mode: Mode
    verify_lens: Tensor  # [bs]; zeros for a plain step
    tokens_per_second: float  # predicted for the chosen plan
    predicted: dict  # mode -> the best predicted tokens per second of that mode


def deep_pass_weight(tuned_depth: int, num_layers: int, head_share: float = 0.0,
                     draft_head_fraction: float = 1.0) -> float:
    """A forward through the final N layers and the LM head, as a fraction of a full forward of the same rows, whose
    cost `head_share` of is the head's; a draft row reads `draft_head_fraction` of the head (its draft vocabulary)."""
    return head_share * draft_head_fraction + (1 - head_share) * tuned_depth / num_layers


def step_seconds(mode: Mode, cost: ForwardCostTable, *, batch_size: int, full_rows: float, block_size: int,
                 deep_weight: float, fused_parallel: bool) -> float:
    """Predicted time of one step. full_rows: the verify forward's rows, sum over requests of (v + 1); deep_weight:
    a deep-only row's share of a full-depth one (`deep_pass_weight`)."""
    bs, kept_block = batch_size, batch_size * block_size
    if mode is Mode.PLAIN:
        return cost.seconds_for(bs)
    if mode is Mode.PARALLEL:
        if fused_parallel:  # every hypothesis block rides in the verify forward
            return cost.seconds_for(full_rows * (1 + block_size * deep_weight))
        return cost.seconds_for(full_rows) + deep_weight * cost.seconds_for(kept_block)
    if fused_parallel:  # draft forward: the bonus and its block together
        return cost.seconds_for(full_rows) + cost.seconds_for(bs + kept_block * deep_weight)
    return cost.seconds_for(full_rows) + cost.seconds_for(bs) + deep_weight * cost.seconds_for(kept_block)


def plan_step(
    draft_top_probs: Tensor,
    cost: ForwardCostTable,
    *,
    block_size: int,
    tuned_depth: int,
    num_layers: int,
    rule: str = "cumulative_product",
    threshold: float = 0.01,
    modes: tuple[Mode, ...] = (Mode.PLAIN, Mode.PARALLEL, Mode.SEQUENTIAL),
    fused_parallel: bool = True,
    verify_caps: tuple[int, ...] | None = None,
    acceptance_scale: float = 1.0,
    head_share: float = 0.0,
    draft_head_fraction: float = 1.0,
) -> StepPlan:
    """Choose the mode and per-request verify lengths. draft_top_probs: [bs, B-1] top probability of each draft.
    Verify lengths are the confidence rule's, cut at each cap in `verify_caps` (default 1..B-1: the verify-length
    tiers an engine can run); the best (mode, cap) pair wins. `acceptance_scale` corrects the accepted drafts that
    confidence predicts by what was measured (`AcceptanceTracker.scale`); `head_share` is the LM head's share of a
    full forward's cost and `draft_head_fraction` the part of it a draft row reads (`deep_pass_weight`)."""
    bs = draft_top_probs.shape[0]
    rule_lens = verify_lengths(draft_top_probs, rule, threshold, max_len=block_size - 1)
    caps = verify_caps or tuple(range(1, block_size))
    deep_weight = deep_pass_weight(tuned_depth, num_layers, head_share, draft_head_fraction)
    best: dict[Mode, tuple[float, Tensor]] = {}
    for mode in modes:
        for cap in (0,) if mode is Mode.PLAIN else caps:
            verify = rule_lens.clamp(max=cap)
            drafts = acceptance_scale * (expected_tokens(draft_top_probs, verify) - 1)
            tokens = float(bs if mode is Mode.PLAIN else (1 + drafts).sum())
            tokens += bs if mode is Mode.SEQUENTIAL else 0
            seconds = step_seconds(mode, cost, batch_size=bs, full_rows=float((verify + 1).sum()),
                                   block_size=block_size, deep_weight=deep_weight, fused_parallel=fused_parallel)
            if mode not in best or tokens / seconds > best[mode][0]:
                best[mode] = (tokens / seconds, torch.zeros_like(verify) if mode is Mode.PLAIN else verify)
    chosen = max(best, key=lambda m: best[m][0])
    return StepPlan(chosen, best[chosen][1], best[chosen][0], {m: rate for m, (rate, _) in best.items()})


def row_outcomes(accepted: Tensor, top_probs: Tensor, rows: int) -> Tensor:
    """One verify step's outcome per draft row, summed over its requests: [3, rows] float32 of (accepted, reached,
    predicted). top_probs [bs, v]: the verified drafts' confidence; accepted [bs]: how many of them were accepted.
    Row j (from 0) was reached when it was verified with every row before it accepted (accepted >= j), accepted when
    accepted > j, and confidence predicted it accepted with q_1 * ... * q_{j+1}; rows from v on count nothing. Stays
    on the inputs' device: no host sync."""
    v = top_probs.shape[1]
    j = torch.arange(rows, device=accepted.device)
    a = accepted[:, None]
    survive = torch.nn.functional.pad(torch.cumprod(top_probs.float(), 1), (0, rows - v))
    return torch.stack([(a > j).sum(0).float(), ((a >= j) & (j < v)).sum(0).float(), survive.sum(0)])


@dataclass
class AcceptanceTracker:
    """Measured acceptance per draft row (`row_outcomes`, exponentially decayed sums over recent verified requests),
    read two ways:
      rates   each row's acceptance given the rows before it were accepted, with one optimistic pseudo-observation,
              so a row not verified lately reads close to 1 and is explored again: the verify-length cap of the
              confidence rule (`confidence.measured_verify_len`).
      scale   accepted drafts over the drafts confidence predicted: flex's correction in `plan_step`. A weakly
              trained adapter's confidence overstates its acceptance, and a policy that believes it keeps paying for
              drafts that fail.
    The sums decay per verified request, not per step, so that a row reached once in a hundred requests is still
    measured at batch 1. Steps without drafting (flex's plain steps) forget a share of them, pulling both readings
    back towards optimism, so a policy that settled on plain decoding tries speculation again now and then."""

    rows: int
    decay: float = 0.999
    recovery: float = 0.1
    sums: Tensor = field(init=False)  # [3, rows] float64: accepted, reached, predicted

    def __post_init__(self):
        self.sums = torch.zeros(3, self.rows, dtype=torch.float64)

    @property
    def rates(self) -> Tensor:
        accepted, reached, _ = self.sums
        return (accepted + 1) / (reached + 1)

    @property
    def scale(self) -> float:
        accepted, _, predicted = self.sums.sum(1).tolist()
        return (accepted + 1) / (predicted + 1)

    def observe(self, outcomes: Tensor, requests: int) -> None:
        """Add `row_outcomes` summed over steps that verified `requests` requests in all."""
        self.sums = self.decay ** requests * self.sums + outcomes.to(self.sums)

    def idle(self) -> None:
        self.sums = (1 - self.recovery) * self.sums


def plain_tokens_per_second(batch_size: int, cost: ForwardCostTable) -> float:
    """Plain decoding's predicted rate on the same table, for comparison."""
    return batch_size / cost.seconds_for(batch_size)


def default_cost_table() -> ForwardCostTable:
    """A memory-bound stand-in for when nothing was measured: flat up to 64 rows, then linear."""
    return ForwardCostTable((1, 64, 4096), (1.0, 1.0, 64.0))

