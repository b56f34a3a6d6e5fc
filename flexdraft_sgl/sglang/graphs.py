"""CUDA graphs for FLEXDRAFT's target forwards: one graph set per forward width, each over SGLang's batch-size buckets.

Every target forward FLEXDRAFT runs is a TARGET_VERIFY forward of a fixed number of rows per request:
  verify      [bonus, d1..dv]: width v+1 (parallel and sequential steps)
  bonus       [bonus]: width 1 (the draft forward of a sequential step, and a plain step of flex mode)
SGLang captures TARGET_VERIFY graphs at ONE width per runner (`DecodeCudaGraphRunner.captured_req_width`), so a
FLEXDRAFT server holds one runner, with its own attention backend, per width it may run: the verify lengths are
rounded up to a few tiers (verifying more of the drafts already drawn is lossless, it only costs rows) and the worker
activates the set of the width it is about to run. This is how SGLang's adaptive EAGLE keeps one runtime state per
step count (`EAGLEWorkerV2.build_adaptive_runtime_state` / `apply_runtime_state`, sglang/srt/speculative/
eagle_worker_v2.py, 0.5.23); FLEXDRAFT builds its sets the same way.

The bookkeeping (tiers, which widths a mode needs, which set runs a batch) is pure and tested on CPU; `GraphSets.build`
needs a GPU. The mask-block pass through the final N layers is not captured (it runs eagerly; see drafter.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


def verify_tiers(max_verify: int) -> tuple[int, ...]:
    """Verify lengths that get their own graphs: 1, 3, 7, 15, ... (each about twice the last) and the maximum, so a
    length is never rounded up to more than about twice itself. 7 -> (1, 3, 7); 5 -> (1, 3, 5); 15 -> (1, 3, 7, 15)."""
    if max_verify < 1:
        raise ValueError(f"max_verify must be at least 1, got {max_verify}")
    tiers, t = [], 1
    while t < max_verify:
        tiers.append(t)
        t = 2 * t + 1
    return tuple(tiers) + (max_verify,)


def tier_for(verify_len: int, tiers: tuple[int, ...]) -> int:
    """The smallest tier that holds `verify_len` drafts."""
    for t in tiers:
        if verify_len <= t:
            return t
    raise ValueError(f"verify length {verify_len} exceeds the largest tier {tiers[-1]}")


def widths_for_mode(mode: str, tiers: tuple[int, ...]) -> tuple[int, ...]:
    """Forward widths (rows per request) a mode runs: verify tiers + 1, and width 1 where the mode forwards a bonus
    alone (sequential's draft forward, flex's plain steps)."""
    widths = {t + 1 for t in tiers}
    if mode in ("sequential", "flex"):
        widths.add(1)
    return tuple(sorted(widths))


def batch_bucket(batch_size: int, captured: list[int] | tuple[int, ...]) -> int | None:
    """The captured batch size a batch is padded to, or None when it is larger than every one (runs eagerly)."""
    fitting = [b for b in captured if b >= batch_size]
    return min(fitting) if fitting else None


@dataclass
class GraphSet:
    """What a width needs at run time: its attention backend and the graph runner captured with it."""

    width: int
    attn_backend: object
    graph_runner: object | None  # None when graphs are disabled (e.g. --disable-cuda-graph): eager with its backend


@dataclass
class GraphSets:
    """The sets of one server, keyed by width; `activate` installs one on the target's model runner."""

    model_runner: object
    sets: dict[int, GraphSet] = field(default_factory=dict)
    active: int | None = None

    def register_startup(self, width: int) -> None:
        """The set SGLang built itself at start-up (`tp_worker.init_cuda_graphs`, at speculative_num_draft_tokens)."""
        runner = self.model_runner
        self.sets[width] = GraphSet(width, runner.attn_backend, getattr(runner, "decode_cuda_graph_runner", None))
        self.active = width

    def build(self, widths: tuple[int, ...]) -> None:
        """Capture every missing width, as adaptive EAGLE does: under an override of the spec widths, a fresh
        attention backend (own workspace) and a fresh DecodeCudaGraphRunner over SGLang's batch-size buckets."""
        from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, check_cuda_graph_backend
        from sglang.srt.model_executor.runner import DecodeCudaGraphRunner
        from sglang.srt.runtime_context import get_spec

        runner = self.model_runner
        capture = not check_cuda_graph_backend(Phase.DECODE, Backend.DISABLED)
        for width in widths:
            if width in self.sets:
                continue
            with get_spec().override(speculative_num_steps=max(width - 1, 1), speculative_num_draft_tokens=width):
                saved = runner.init_new_workspace
                try:
                    backend = runner._get_attention_backend(init_new_workspace=True)
                finally:
                    runner.init_new_workspace = saved
                graphs = None
                if capture:
                    previous = runner.attn_backend
                    runner.attn_backend = backend  # the capture plans its attention through the runner's backend
                    try:
                        graphs = DecodeCudaGraphRunner(runner, attn_backend=backend,
                                                       speculative_num_steps=max(width - 1, 1),
                                                       speculative_num_draft_tokens=width)
                    finally:
                        runner.attn_backend = previous
            self.sets[width] = GraphSet(width, backend, graphs)
            logger.info("FLEXDRAFT: graph set for width %d built (%s)", width, "captured" if graphs else "eager")

    def activate(self, width: int) -> None:
        """Make the target's forwards run the set of this width (no-op when it is already active)."""
        if width == self.active:
            return
        chosen = self.sets.get(width)
        if chosen is None:
            raise KeyError(f"no FLEXDRAFT graph set for width {width}; built: {sorted(self.sets)}")
        self.model_runner.attn_backend = chosen.attn_backend
        self.model_runner.decode_cuda_graph_runner = chosen.graph_runner
        self.active = width
