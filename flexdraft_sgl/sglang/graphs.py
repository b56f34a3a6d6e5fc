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

Memory: the sets are built after SGLang sized its KV pool, so they are budgeted. What grows is the attention backend's
graph state, one entry per captured verify row and context position (`GRAPH_STATE_BYTES`); the sets share SGLang's
FlashInfer workspace instead of a fresh 384-512 MiB each (they run one at a time on one stream, as SGLang's two-batch-
overlap backends share it). Before capture, `plan_sets` gives each width, narrowest first, SGLang's batch buckets up
to the largest that still fits the free memory above `HEADROOM_BYTES`; larger batches of that width, or every batch
of a width that fits none, run eagerly with its backend. Each set logs what it captured or skipped.

The bookkeeping (tiers, which widths a mode needs, which set runs a batch, the memory plan) is pure and tested on CPU;
`GraphSets.build` needs a GPU. The mask-block pass through the final N layers is not captured (it runs eagerly; see
drafter.py).
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


# Bytes per (captured verify row x context position) of an attention backend's CUDA-graph state, which dominates a
# set's memory: flashinfer allocates int32 KV indices and a uint8 custom-mask buffer that long (FlashInferAttnBackend.
# init_cuda_graph_state, layers/attention/flashinfer_backend.py), triton int64 KV indices and a uint8 verify mask
# (TritonAttnBackend.init_cuda_graph_state, triton_backend.py).
GRAPH_STATE_BYTES = {"flashinfer": 5, "triton": 9}
# Free memory the extra sets leave for SGLang's eager prefill and FLEXDRAFT's eager mask-block pass and sampling (an
# estimate: an 8B model's chunked-prefill activations take 1-2 GiB).
HEADROOM_BYTES = 4 << 30


def set_bytes(max_bs: int, width: int, context_len: int, backend: str) -> int:
    """Estimated graph-state memory of one width's set captured up to batch size `max_bs`."""
    return max_bs * width * context_len * GRAPH_STATE_BYTES.get(backend, max(GRAPH_STATE_BYTES.values()))


def plan_sets(widths, buckets, context_len: int, backend: str, budget: int) -> dict[int, tuple[int, ...]]:
    """The batch sizes to capture per width within `budget` bytes for all sets together. Narrower widths go first
    (they cost least, and width 1 runs every sequential and plain step); each keeps SGLang's buckets up to the
    largest whose graph state still fits; () means the width runs eagerly."""
    plan = {}
    for width in sorted(widths):
        plan[width] = tuple(b for b in sorted(buckets) if set_bytes(b, width, context_len, backend) <= budget)
        if plan[width]:
            budget -= set_bytes(plan[width][-1], width, context_len, backend)
    return plan


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
        """Capture every missing width as adaptive EAGLE does (under an override of the spec widths, an attention
        backend and a DecodeCudaGraphRunner of its own), over the batch buckets `plan_sets` affords it."""
        import torch
        from sglang.srt.model_executor.cuda_graph_config import Backend, Phase, check_cuda_graph_backend, with_phase
        from sglang.srt.runtime_context import get_exec, get_spec

        runner = self.model_runner
        missing = [w for w in widths if w not in self.sets]
        plan = dict.fromkeys(missing, ())
        graph = get_exec().graph
        if not check_cuda_graph_backend(Phase.DECODE, Backend.DISABLED):
            backend_name, context_len = runner.decode_attention_backend_str, runner.model_config.context_len
            # SGLang's buckets, as its runner clamps them to the request pool (get_batch_sizes_to_capture)
            buckets = sorted({min(b, runner.req_to_token_pool.size) for b in graph.cuda_graph_config.decode.bs})
            budget = torch.cuda.mem_get_info()[0] - HEADROOM_BYTES
            plan = plan_sets(missing, buckets, context_len, backend_name, budget)
            logger.info("FLEXDRAFT: graph sets for widths %s within %.2f GiB (the free memory above %.0f GiB of "
                        "headroom; %s graph state at context %d)", missing, budget / 2**30, HEADROOM_BYTES / 2**30,
                        backend_name, context_len)
        for width in missing:
            buckets = plan[width]
            with get_spec().override(speculative_num_steps=max(width - 1, 1), speculative_num_draft_tokens=width):
                backend = self._backend()
                graphs = None
                if buckets:
                    config = with_phase(graph.cuda_graph_config, Phase.DECODE, bs=list(buckets))
                    with graph.override(cuda_graph_config=config):
                        graphs = self._capture(width, backend)
            self.sets[width] = GraphSet(width, backend, graphs)
            logger.info("FLEXDRAFT: graph set for width %d %s", width,
                        f"captured for batch sizes up to {buckets[-1]}" if buckets else "eager (no graphs)")

    def _backend(self):
        """A fresh attention backend for the current spec widths, on SGLang's shared workspace."""
        runner = self.model_runner
        saved = runner.init_new_workspace
        try:
            return runner._get_attention_backend(init_new_workspace=False)
        finally:
            runner.init_new_workspace = saved

    def _capture(self, width: int, backend):
        from sglang.srt.model_executor.runner import DecodeCudaGraphRunner

        runner = self.model_runner
        previous = runner.attn_backend
        runner.attn_backend = backend  # the capture plans its attention through the runner's backend
        try:
            return DecodeCudaGraphRunner(runner, attn_backend=backend, speculative_num_steps=max(width - 1, 1),
                                         speculative_num_draft_tokens=width)
        finally:
            runner.attn_backend = previous

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
