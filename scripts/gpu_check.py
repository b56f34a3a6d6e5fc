#!/usr/bin/env python3
"""FlexDraft's GPU checks in one run (at most 8 minutes on one H200): kernels, CUDA graphs of a step, the cost table.

Device command (from the repo root; `run` with timeout_s 540 leaves time for the script's own 450 s budget):
    PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out $OUT
With FlashInfer importable (a machine with SGLang installed), or installed from a folder of wheels:
    PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --out $OUT --wheels .whl
A smoke run anywhere, CPU included (every GPU-only part is recorded as "skipped: no CUDA"):
    OMP_NUM_THREADS=1 python scripts/gpu_check.py --small --out /tmp/gpu-check

What it does NOT cover (also written into results.json and summary.md, see NOT_COVERED): it imports neither SGLang
nor transformers, so nothing of the SGLang path runs: not the plugin, the worker, SGLang's model and attention
backends, their TARGET_VERIFY masks, the graph sets of sglang/graphs.py or the mask-block drafter of
sglang/drafter.py. Its step is its own static Llama with SDPA attention. FlashInfer (check 4) runs only where it
imports: the 0.7.2 wheel (62 MiB) does not fit beside the repo in a 64 MiB device call, so on lent machines without it
check 4 reports it unavailable. The SGLang path is checked by the README's "First run on a GPU" commands.

Writes to --out: results.json (every check's numbers, or its skip reason, or its traceback), summary.md (the same as
tables) and, on a GPU, cost_table.json in ForwardCostTable.to_json() format. Results are rewritten after every check
and every graph key, so a killed run still leaves what it measured. To keep a run, copy those files into the repo as
eval/results/gpu-check/<YYYY-MM-DD>-<gpu>/ and point FLEXDRAFT_COST_TABLE at its cost_table.json.

Checks, in the order they run (FlashInfer last: without carried AOT kernels it JIT-compiles for minutes):
  calibration   flexdraft_sgl.kernels.calibration: calibrate_triton vs calibrate_reference (and a float32 gold)
                at 8B shapes (H 4096, r 256, V 128256, M = 15/240/960 rows), errors and times.
  cost_table    a random 8B-shaped Llama (StaticLlama below): full-depth forward time against rows under CUDA graphs
                -> cost_table.json; the N-layer mask-block pass against rows, replayed from a CUDA graph and run
                eagerly, against the policy's N/L assumption (SGLang's drafter runs it eagerly, plus a FlashInfer plan
                with a host sync per step, so flex's drafting cost, N/L of a graphed forward, is a lower bound at small
                batch); plan_step decisions on the measured table.
  cuda_graphs   one CUDAGraph per (mode, verify length, batch size) of a whole FlexDraft step as the SGLang worker
                runs it (verify, greedy acceptance, kept mask block, calibration), replay == eager; plain decoding's
                step for comparison; on a small float32 model, the static step against the spec (core.layout and
                core.masks) and its greedy output against plain greedy decoding (lossless).
  flashinfer    FlashInferMaskAttention (paged prefix + ragged masked rows) vs SDPA over core.masks.dense_mask.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bootstrap() -> None:
    """Make flexdraft_sgl importable from this checkout without installing it (the GPU machine gets a copy of the
    repo): the repo root on sys.path, and flexdraft_sgl.kernels loaded from kernels/ (pyproject's package-dir)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import flexdraft_sgl

    if "flexdraft_sgl.kernels" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        "flexdraft_sgl.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    flexdraft_sgl.kernels = module


_bootstrap()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from flexdraft_sgl.adapter import AdapterConfig, CalibrationMLP, FlexDraftAdapter, TargetSpec  # noqa: E402
from flexdraft_sgl.core.acceptance import greedy_verify  # noqa: E402
from flexdraft_sgl.core.layout import build_layout, parallel_layout, verify_layout  # noqa: E402
from flexdraft_sgl.core.masks import dense_mask, padded_rows, ragged_mask, ragged_packed_mask  # noqa: E402
from flexdraft_sgl.core.policy import ForwardCostTable, Mode, plain_tokens_per_second, plan_step  # noqa: E402
from flexdraft_sgl.core.policy import step_seconds  # noqa: E402
from flexdraft_sgl.sglang.graphs import batch_bucket, verify_tiers, widths_for_mode  # noqa: E402

NO_CUDA = "skipped: no CUDA"
NOT_COVERED = ("the SGLang path (plugin, worker, SGLang's model, attention backends and TARGET_VERIFY masks, the graph "
               "sets of sglang/graphs.py, the eager mask-block drafter of sglang/drafter.py): this script runs its own "
               "static Llama with SDPA; FlashInfer only where it imports. See the README's 'First run on a GPU'.")
RMS_EPS = 1e-6


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- shapes ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tuned: int  # N: layers with tuned projectors for mask rows
    block: int  # B
    rank: int  # calibration MLP width r
    lmax: int  # cache slots per request (each request also gets B scratch slots for its mask block)
    max_bs: int
    init_std: float
    rope_theta: float
    dtype: str

    @property
    def split(self) -> int:
        return self.layers - self.tuned

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


# Llama-3.1-8B's shapes; random weights at the usual init std.
FULL = Shape(32, 4096, 32, 8, 128, 14336, 128256, 4, 16, 256, 1024, 64, 0.02, 500000.0, "bfloat16")
# Tiny float32 model: a large init std makes its distributions peaked, so no near-tie flips an argmax.
SMALL = Shape(2, 64, 4, 2, 16, 128, 500, 1, 8, 16, 128, 4, 0.3, 10000.0, "float32")


@dataclass(frozen=True)
class Plan:
    """What each check runs at the chosen size."""

    shape: Shape
    calib_rows: tuple[int, ...]
    calib_dims: tuple[int, int, int, int]  # H, r, V, V' (padded logits)
    graph_bs: tuple[int, ...]
    cost_rows: tuple[int, ...]
    plan_bs: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    plan_conf: tuple[float, ...] = (0.2, 0.5, 0.8, 0.95)
    replays: int = 20


FULL_PLAN = Plan(FULL, (15, 240, 960), (4096, 256, 128256, 128256), (1, 8, 32),
                 (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
SMALL_PLAN = Plan(SMALL, (7, 56), (64, 16, 500, 512), (1, 3), (1, 2, 4, 8, 16, 32), replays=5)


# ---- budget and results ------------------------------------------------------------------------------------------
class BudgetExceeded(RuntimeError):
    pass


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def check(self, what: str, need: float = 5.0) -> None:
        if self.left() < need:
            raise BudgetExceeded(f"{self.left():.0f} s of the budget left, {need:.0f} s needed before {what}")


class Recorder:
    """results.json + summary.md under `out`, rewritten atomically whenever something new is known."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        self.data = {"meta": meta, "checks": {}}

    def write(self) -> None:
        self.data["meta"]["written_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        _atomic_write(self.out / "results.json", json.dumps(self.data, indent=1, default=_jsonable))
        _atomic_write(self.out / "summary.md", summary_markdown(self.data))

    def run(self, name: str, fn, ctx) -> None:
        entry = self.data["checks"][name] = {"status": "running", "results": {}}
        log(f"check {name}: start ({ctx.budget.left():.0f} s of budget left)")
        t0 = time.monotonic()
        try:
            ctx.budget.check(f"check {name}", need=10.0)
            fn(ctx, entry)
            entry["status"] = entry.get("final_status", "ok")
        except BudgetExceeded as e:
            entry["status"], entry["reason"] = "stopped", f"stopped: time budget ({e})"
        except Exception as e:  # recorded; the next check still runs
            entry["status"], entry["error"] = "error", traceback.format_exc()
            log(f"check {name}: ERROR {type(e).__name__}: {e}")
        entry.pop("final_status", None)
        entry["seconds"] = round(time.monotonic() - t0, 2)
        log(f"check {name}: {entry['status']} in {entry['seconds']} s")
        self.write()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    return str(x)


@dataclass
class Context:
    args: argparse.Namespace
    plan: Plan
    device: torch.device
    budget: Budget
    recorder: Recorder
    model: StaticLlama | None = None
    cost_table: ForwardCostTable | None = None

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def get_model(self) -> StaticLlama:
        if self.model is None:
            t0 = time.monotonic()
            self.model = StaticLlama(self.plan.shape, self.device, seed=self.args.seed)
            sync(self.device)
            log(f"model {self.plan.shape.layers} layers x {self.plan.shape.hidden} built in "
                f"{time.monotonic() - t0:.1f} s ({_gib(self.device)})")
        return self.model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gib(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return f"{torch.cuda.memory_allocated(device) / 2**30:.1f} GiB allocated"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ---- the static model --------------------------------------------------------------------------------------------
def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)).to(x.dtype) * weight


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [bs, W, heads, hd]; cos, sin [bs, W, 1, hd] float32 (Llama's rotate-half form)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], -1)
    return (xf * cos + rotated * sin).to(x.dtype)


class StaticLlama:
    """A Llama with random weights, a static KV cache and a random FlexDraft adapter: enough to run FlexDraft's steps
    as the SGLang worker does, with static shapes and no CPU syncs (CUDA-graph capturable).

    KV cache: per layer [max_bs, lmax + B, kv_heads, head_dim] (SGLang's pool layout, one row of slots per request);
    slots lmax.. are each request's scratch for its mask block, so mask-row K/V never enter the cache proper.
    Attention is SDPA with an additive mask computed on the device from length tensors; the G query heads of a kv
    head are stacked as G*W query rows, so K/V are never copied per query head."""

    def __init__(self, shape: Shape, device: torch.device, seed: int = 0):
        s, dt = shape, shape.torch_dtype
        self.shape, self.device, self.dtype = s, device, dt
        self.calibrate = None  # set below; the Triton kernels on CUDA
        g = torch.Generator(device=device).manual_seed(seed)

        def rand(*size):
            return torch.randn(*size, generator=g, device=device, dtype=dt).mul_(s.init_std)

        def ones(n):
            return torch.ones(n, device=device, dtype=dt)

        H, hd = s.hidden, s.head_dim
        self.q_size, self.kv_size = s.heads * hd, s.kv_heads * hd
        self.embed = rand(s.vocab, H)
        self.layers = [
            dict(ln1=ones(H), ln2=ones(H), wqkv=rand(self.q_size + 2 * self.kv_size, H), wo=rand(H, self.q_size),
                 wgu=rand(2 * s.ffn, H), wdown=rand(H, s.ffn))
            for _ in range(s.layers)
        ]
        self.norm, self.lm_head = ones(H), rand(s.vocab, H)

        # The adapter is the project's own module with every weight random (CalibrationMLP zero-inits `down`).
        spec = TargetSpec("LlamaForCausalLM", s.layers, H, s.heads, s.kv_heads, hd, s.vocab, False, False)
        config = AdapterConfig(spec, tuned_depth=s.tuned, block_size=s.block, calibration_rank=s.rank)
        with torch.device(device):
            adapter = FlexDraftAdapter(config)
        with torch.no_grad():
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g, device=device).mul_(s.init_std))
        self.adapter = adapter.to(dt).requires_grad_(False)
        self.tuned = [  # q/k/v fused like SGLang's QKVParallelLinear (drafter.TunedProjectors)
            dict(wqkv=torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]), wo=a.o_proj.weight)
            for a in self.adapter.attention
        ]
        self.mask_embedding = self.adapter.mask_embedding
        self.calibration = self.adapter.calibration

        from flexdraft_sgl.kernels.calibration import calibrate_reference, calibrate_triton

        self.calibrate = calibrate_triton if device.type == "cuda" else calibrate_reference
        self.calibrate_reference = calibrate_reference

        self.slots = s.lmax + s.block
        self.arange = torch.arange(self.slots + s.block, device=device)
        inv_freq = 1.0 / (s.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
        freqs = torch.outer(self.arange.float(), inv_freq)
        self.cos, self.sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()
        cache = (s.layers, s.max_bs, self.slots, s.kv_heads, hd)
        self.k_cache = torch.zeros(cache, device=device, dtype=dt)
        self.v_cache = torch.zeros(cache, device=device, dtype=dt)

    # -- pieces --
    def _bias(self, visible: torch.Tensor) -> torch.Tensor:
        """visible [bs, W, keys] -> additive mask [bs, 1, G*W, keys], built once per forward for every layer."""
        bs, W, keys = visible.shape
        g = self.shape.heads // self.shape.kv_heads
        bias = torch.zeros(visible.shape, device=visible.device, dtype=self.dtype).masked_fill_(~visible, -math.inf)
        return bias[:, None, None].expand(bs, 1, g, W, keys).reshape(bs, 1, g * W, keys)

    def _sdpa(self, q, k, v, bias):
        if self.device.type != "cuda":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        # Memory-efficient attention takes an arbitrary additive mask; pinned so eager and replay run one kernel.
        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    def _attend(self, q, k, v, bias):
        """q [bs, W, Hq, hd]; k, v [bs, keys, Hkv, hd] (cache views) -> [bs, W, Hq*hd]."""
        bs, W, hq, hd = q.shape
        hkv = k.shape[2]
        g = hq // hkv
        qg = q.view(bs, W, hkv, g, hd).permute(0, 2, 3, 1, 4).reshape(bs, hkv, g * W, hd)
        o = self._sdpa(qg, k.transpose(1, 2), v.transpose(1, 2), bias)
        return o.view(bs, hkv, g, W, hd).permute(0, 3, 1, 2, 4).reshape(bs, W, hq * hd)

    def _qkv(self, h, weights, bs, W):
        q, k, v = F.linear(h, weights["wqkv"]).split([self.q_size, self.kv_size, self.kv_size], -1)
        hd = self.shape.head_dim
        return q.view(bs, W, -1, hd), k.view(bs, W, -1, hd), v.view(bs, W, -1, hd)

    def _mlp(self, i, x):
        w = self.layers[i]
        gate, up = F.linear(rms(x, w["ln2"]), w["wgu"]).chunk(2, -1)
        return x + F.linear(F.silu(gate) * up, w["wdown"])

    def _layer(self, i, x, cos, sin, rows, slots, keys, bias, tuned=None):
        """One decoder layer over x [bs, W, H]: the rows' K/V are written at `slots` of the cache, then attention over
        the first `keys` slots under `bias`. `tuned`: the adapter's projectors (mask rows)."""
        bs, W, _ = x.shape
        proj = tuned or self.layers[i]
        q, k, v = self._qkv(rms(x, self.layers[i]["ln1"]), proj, bs, W)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        kc, vc = self.k_cache[i, :bs], self.v_cache[i, :bs]
        kc[rows, slots] = k
        vc[rows, slots] = v
        x = x + F.linear(self._attend(q, kc[:, :keys], vc[:, :keys], bias), proj["wo"])
        return self._mlp(i, x)

    def _rope_at(self, pos):
        return self.cos[pos][:, :, None], self.sin[pos][:, :, None]

    # -- forwards --
    def forward(self, tokens: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """Rows `tokens` [bs, W] at positions prefix.. through every layer, causal, K/V written to the cache there
        (as a TARGET_VERIFY forward). Returns the last layer's hidden states [bs, W, H] (before the final norm)."""
        bs, W = tokens.shape
        lmax = self.shape.lmax
        pos = prefix[:, None] + self.arange[:W]
        rows = self.arange[:bs, None].expand(bs, W)
        bias = self._bias(self.arange[None, None, :lmax] <= pos[:, :, None])
        cos, sin = self._rope_at(pos)
        x = self.embed[tokens]
        for i in range(self.shape.layers):
            x = self._layer(i, x, cos, sin, rows, pos, lmax, bias)
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rms(x, self.norm), self.lm_head)

    def deep_block(self, committed: torch.Tensor) -> torch.Tensor:
        """The mask block anchored after each request's `committed` tokens through the final N layers (drafter.py):
        row j enters layer L-N with mask embedding j at position committed+j, uses the tuned projectors, sees the
        committed prefix and its whole block. Returns hidden [bs, B, H] (before the final norm)."""
        s = self.shape
        bs, B = committed.shape[0], s.block
        pos = committed[:, None] + self.arange[:B]
        rows = self.arange[:bs, None].expand(bs, B)
        scratch = (s.lmax + self.arange[:B])[None].expand(bs, B)
        key = self.arange[: self.slots]
        visible = (key[None, :] < committed[:, None]) | (key[None, :] >= s.lmax)
        bias = self._bias(visible[:, None, :].expand(bs, B, self.slots))
        cos, sin = self._rope_at(pos)
        x = self.mask_embedding[None].expand(bs, B, s.hidden)
        for n, tuned in enumerate(self.tuned):
            x = self._layer(s.split + n, x, cos, sin, rows, scratch, self.slots, bias, tuned)
        return x

    def draft(self, committed: torch.Tensor, resolved: torch.Tensor):
        """Next drafts: the block after `committed` tokens, rows 1..B-1 normed, LM head, calibrated with the token at
        row 0's slot (`resolved`). Returns CalibratedDrafts [bs, B-1]."""
        hidden = rms(self.deep_block(committed), self.norm)[:, 1:]
        bonus_embedding = self.embed[resolved][:, None].expand_as(hidden)
        return self.calibrate(self.calibration, bonus_embedding, hidden, F.linear(hidden, self.lm_head))

    # -- steps (what gets captured) --
    def step(self, io: StepIO, mode: str, v: int, bs: int) -> None:
        """One FlexDraft step of the first `bs` requests from io's inputs to its outputs, as worker._decode runs it:
        verify [bonus, d1..dv] at full depth, greedy acceptance, then (sequential) a one-row forward of the new bonus
        for one exact token t, and the mask block after the last committed token, calibrated with the token at its
        row-0 slot."""
        prefix, bonus, drafts = io.prefix[:bs], io.bonus[:bs], io.drafts[:bs, :v]
        W = v + 1
        logits = self.logits(self.forward(torch.cat([bonus[:, None], drafts], 1), prefix))  # [bs, W, V]
        verify = torch.full((bs,), v, dtype=torch.long, device=prefix.device)
        accepted, new_bonus = greedy_verify(drafts, logits.argmax(-1), verify)
        committed = prefix + accepted + 1  # c0..ca
        resolved = new_bonus
        if mode == "sequential":
            resolved = self.logits(self.forward(new_bonus[:, None], committed))[:, 0].argmax(-1)
            committed = committed + 1
        d = self.draft(committed, resolved)
        io.out_accepted[:bs].copy_(accepted)
        io.out_bonus[:bs].copy_(new_bonus)
        io.out_t[:bs].copy_(resolved)
        io.out_prefix[:bs].copy_(committed)
        io.out_drafts[:bs].copy_(d.tokens)
        io.out_top[:bs].copy_(d.top)
        io.out_vmax[:bs, :W].copy_(logits.amax(-1))
        io.out_vlogits0[:W].copy_(logits[0])
        io.out_dlogits0.copy_(d.logits[0])

    def plain_step(self, io: StepIO, bs: int) -> None:
        """Plain decoding: the bonus alone at full depth, its argmax."""
        logits = self.logits(self.forward(io.bonus[:bs, None], io.prefix[:bs]))[:, 0]
        io.out_bonus[:bs].copy_(logits.argmax(-1))
        io.out_prefix[:bs].copy_(io.prefix[:bs] + 1)
        io.out_vlogits0[:1].copy_(logits[:1])

    def prefill(self, prompts: torch.Tensor, lens: torch.Tensor):
        """Prompts [bs, P] (request i's first lens[i] tokens count): cache them, first token t from the last prompt
        row, first drafts from the block after the prompt calibrated with t. Rows past a prompt write slots that are
        rewritten before anything reads them."""
        bs = prompts.shape[0]
        x = self.forward(prompts, torch.zeros(bs, dtype=torch.long, device=prompts.device))
        first = self.logits(x[torch.arange(bs, device=x.device), lens - 1]).argmax(-1)
        return first, self.draft(lens, first).tokens

    # -- the spec, for comparison (eager; reads the cache below each request's prefix only) --
    def reference_forward(self, layout, tokens: torch.Tensor) -> torch.Tensor:
        """FLEXDRAFT.md's forward of a step layout: candidate rows (`tokens`, flat) through every layer with the
        target's projectors; mask rows from the split layer with their mask embeddings and the tuned projectors;
        SDPA in float32 under core.masks.dense_mask. Returns every row's final hidden (before the norm), flat."""
        s = self.shape
        cand = layout.candidates_only()
        x = self.embed[tokens]
        for i in range(s.split):
            x = self._reference_layer(i, x, cand, None)
        full = x.new_empty(layout.num_rows, s.hidden)
        full[layout.candidate_rows] = x
        m = layout.mask_rows
        j = (layout.row_local[m] - layout.num_candidates[layout.row_request[m]]) % s.block
        full[m] = self.mask_embedding[j]
        for n, tuned in enumerate(self.tuned):
            full = self._reference_layer(s.split + n, full, layout, tuned)
        return full

    def _reference_layer(self, i, x, layout, tuned):
        index, valid = padded_rows(layout)
        dense = dense_mask(layout)
        bs, W = index.shape
        P = dense.shape[2] - W
        X, pos = x[index], layout.row_position[index]
        is_mask = layout.is_mask_row[index][:, :, None, None]
        h = rms(X, self.layers[i]["ln1"])
        q, k, v = self._qkv(h, self.layers[i], bs, W)
        if tuned is not None:
            q, k, v = (torch.where(is_mask, t, c) for t, c in zip(self._qkv(h, tuned, bs, W), (q, k, v)))
        cos, sin = self._rope_at(pos)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        g = self.shape.heads // self.shape.kv_heads
        keys = torch.cat([self.k_cache[i, :bs, :P], k], 1).float().transpose(1, 2).repeat_interleave(g, 1)
        values = torch.cat([self.v_cache[i, :bs, :P], v], 1).float().transpose(1, 2).repeat_interleave(g, 1)
        o = F.scaled_dot_product_attention(q.float().transpose(1, 2), keys, values, attn_mask=dense[:, None])
        o = o.transpose(1, 2).reshape(bs, W, -1).to(self.dtype)
        out = F.linear(o, self.layers[i]["wo"])
        if tuned is not None:
            out = torch.where(is_mask[..., 0], F.linear(o, tuned["wo"]), out)
        return self._mlp(i, X + out)[valid]

    def reference_step(self, mode: str, v: int, prefix, bonus, drafts) -> dict:
        """The step by the spec: parallel = one fused forward of the candidates plus a block after each of them, the
        block after the accepted length kept; sequential = the verify forward, then the draft forward of the
        committed candidates and the new bonus with one block after the bonus."""
        s, bs = self.shape, len(prefix)
        drafts = drafts[:, :v]
        cand = torch.cat([bonus[:, None], drafts], 1)
        verify = torch.full((bs,), v, dtype=torch.long, device=prefix.device)
        layout = (parallel_layout if mode == "parallel" else verify_layout)(prefix, verify, s.block)
        x = self.reference_forward(layout, cand.reshape(-1))
        target = self.logits(x[layout.candidate_rows]).view(bs, v + 1, -1)
        accepted, new_bonus = greedy_verify(drafts, target.argmax(-1), verify)
        resolved = new_bonus
        if mode == "parallel":
            rows = layout.block_rows(layout.block_after(accepted))
        else:
            n = accepted + 2  # c0..ca and the new bonus
            tokens = torch.cat([torch.cat([cand[i, : int(a) + 1], new_bonus[i : i + 1]]) for i, a in enumerate(n - 2)])
            layout = build_layout(prefix, n, [[int(k) - 1] for k in n], s.block)
            x = self.reference_forward(layout, tokens)
            resolved = self.logits(x[layout.last_candidate_rows()]).argmax(-1)
            rows = layout.block_rows(torch.arange(bs, device=prefix.device))
        hidden = rms(x[rows[:, 1:]], self.norm)
        emb = self.embed[resolved][:, None].expand_as(hidden)
        d = self.calibrate_reference(self.calibration, emb, hidden, F.linear(hidden, self.lm_head))
        return dict(accepted=accepted, bonus=new_bonus, t=resolved, drafts=d.tokens, top=d.top, dlogits0=d.logits[0])


class StepIO:
    """Static input and output buffers of a step for up to max_bs requests; every batch size uses the leading rows,
    so one set serves every graph. Outputs are separate from inputs, so a replay is idempotent."""

    OUTPUTS = ("accepted", "bonus", "t", "prefix", "drafts", "top", "vmax", "vlogits0", "dlogits0")
    EXACT = ("accepted", "bonus", "t", "prefix", "drafts")

    def __init__(self, shape: Shape, device: torch.device):
        n, B, V = shape.max_bs, shape.block, shape.vocab
        long = dict(dtype=torch.long, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.prefix, self.bonus = torch.zeros(n, **long), torch.zeros(n, **long)
        self.drafts = torch.zeros(n, B - 1, **long)
        for name in ("accepted", "bonus", "t", "prefix"):
            setattr(self, f"out_{name}", torch.zeros(n, **long))
        self.out_drafts, self.out_top = torch.zeros(n, B - 1, **long), torch.zeros(n, B - 1, **f32)
        self.out_vmax = torch.zeros(n, B, **f32)  # each verify row's max logit: a cheap fingerprint of all of them
        self.out_vlogits0, self.out_dlogits0 = torch.zeros(B, V, **f32), torch.zeros(B - 1, V, **f32)  # request 0

    def load(self, prefix, bonus, drafts) -> None:
        n = len(prefix)
        self.prefix[:n].copy_(prefix)
        self.bonus[:n].copy_(bonus)
        self.drafts[:n].copy_(drafts)

    def outputs(self, bs: int, width: int) -> dict:
        out = {name: getattr(self, f"out_{name}")[:bs].clone() for name in self.OUTPUTS[:6]}
        out["vmax"] = self.out_vmax[:bs, :width].clone()
        out["vlogits0"], out["dlogits0"] = self.out_vlogits0[:width].clone(), self.out_dlogits0.clone()
        return out

    def advance(self, bs: int, mode: str) -> None:
        """The next step's inputs from this step's outputs."""
        self.prefix[:bs].copy_(self.out_prefix[:bs])
        self.bonus[:bs].copy_((self.out_t if mode == "sequential" else self.out_bonus)[:bs])
        self.drafts[:bs].copy_(self.out_drafts[:bs])


def compare_outputs(a: dict, b: dict, exact=StepIO.EXACT) -> dict:
    out = {"exact": all(torch.equal(a[k].cpu(), b[k].cpu()) for k in exact if k in a and k in b)}
    out["mismatched"] = [k for k in exact if k in a and k in b and not torch.equal(a[k].cpu(), b[k].cpu())]
    for k in ("top", "vmax", "vlogits0", "dlogits0"):
        if k in a and k in b:
            out[f"{k}_max_abs"] = float((a[k].float() - b[k].float()).abs().max())
    return out


# ---- decoding loops (eager) --------------------------------------------------------------------------------------
def make_prompts(shape: Shape, bs: int, seed: int, device, min_len: int, max_len: int):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (bs,), generator=g)
    prompts = torch.randint(0, shape.vocab, (bs, max_len), generator=g)
    return prompts.to(device), lens.to(device)


def prefill_state(model: StaticLlama, io: StepIO, prompts, lens) -> None:
    first, drafts = model.prefill(prompts, lens)
    io.load(lens, first, drafts)


def decode_plain(model: StaticLlama, io: StepIO, bs: int, steps: int) -> torch.Tensor:
    """[bs, steps] greedy tokens after io's bonus; io's inputs are left as they were."""
    saved = (io.prefix[:bs].clone(), io.bonus[:bs].clone())
    out = []
    for _ in range(steps):
        model.plain_step(io, bs)
        out.append(io.out_bonus[:bs].clone())
        io.prefix[:bs].copy_(io.out_prefix[:bs])
        io.bonus[:bs].copy_(io.out_bonus[:bs])
    io.prefix[:bs].copy_(saved[0])
    io.bonus[:bs].copy_(saved[1])
    return torch.stack(out, 1)


def oracle_drafts(reference: torch.Tensor, emitted: list[list[int]], vocab: int, B: int, gen: torch.Generator):
    """Drafts that follow plain greedy decoding for a random number of tokens (0..B-1), then random tokens: varied
    accepted lengths from a random model. reference [bs, T]: greedy tokens after the first one."""
    bs = reference.shape[0]
    drafts = torch.randint(0, vocab, (bs, B - 1), generator=gen)
    keep = torch.randint(0, B, (bs,), generator=gen)
    for i in range(bs):
        start = len(emitted[i]) if emitted is not None else 0
        k = int(min(keep[i], reference.shape[1] - start))
        drafts[i, :k] = reference[i, start : start + k].cpu()
    return drafts


def decode_flexdraft(model, io, bs, mode, v, steps, reference=None, seed=0):
    """Greedy FlexDraft decoding for `steps` steps from io's state. With `reference`, each step's drafts are replaced
    by oracle_drafts (the output must not depend on the drafts). Returns (emitted tokens per request, accepted)."""
    gen = torch.Generator().manual_seed(seed)
    emitted: list[list[int]] = [[] for _ in range(bs)]
    accepted_all = []
    for _ in range(steps):
        if reference is not None:
            io.drafts[:bs].copy_(oracle_drafts(reference, emitted, model.shape.vocab, model.shape.block, gen))
        drafts = io.drafts[:bs, :v].cpu()
        model.step(io, mode, v, bs)
        acc, bonus, t = io.out_accepted[:bs].cpu(), io.out_bonus[:bs].cpu(), io.out_t[:bs].cpu()
        for i in range(bs):
            emitted[i] += drafts[i, : int(acc[i])].tolist() + [int(bonus[i])]
            if mode == "sequential":
                emitted[i].append(int(t[i]))
        accepted_all += acc.tolist()
        io.advance(bs, mode)
    return emitted, accepted_all


def lossless_check(model: StaticLlama, modes=("parallel", "sequential"), verify_lens=(1, 3), bs: int = 3,
                   steps: int = 4, seed: int = 0) -> dict:
    """Greedy FlexDraft output of the static model's eager steps against its plain greedy decoding, for each mode and
    verify length, with the adapter's own drafts and with oracle drafts (accepted lengths > 0). Lossless means equal."""
    s = model.shape
    io = StepIO(s, model.device)
    prompts, lens = make_prompts(s, bs, seed, model.device, 3, 12)
    if int(lens.max()) + steps * (s.block + 1) + s.block + 1 > s.lmax:
        raise ValueError("lossless_check would run past the cache; fewer steps or a longer lmax")
    prefill_state(model, io, prompts, lens)
    reference = decode_plain(model, io, bs, steps * (s.block + 1) + s.block)
    results = {}
    for mode in modes:
        for v in verify_lens:
            for drafts in ("adapter", "oracle"):
                prefill_state(model, io, prompts, lens)
                emitted, accepted = decode_flexdraft(model, io, bs, mode, v, steps,
                                                     reference if drafts == "oracle" else None, seed)
                equal = all(e == reference[i, : len(e)].tolist() for i, e in enumerate(emitted))
                results[f"{mode}-v{v}-{drafts}"] = dict(
                    lossless=equal, tokens=sum(map(len, emitted)), accepted_mean=sum(accepted) / len(accepted),
                    accepted_max=max(accepted))
    return results


def spec_check(model: StaticLlama, modes=("parallel", "sequential"), verify_lens=(1, 3), bs: int = 3,
               seed: int = 0) -> dict:
    """The static step against `reference_step` (the spec built from core.layout / core.masks), one step from a
    prefilled state with oracle drafts. In float32 tokens must agree exactly; in bf16 this reports agreement."""
    s = model.shape
    io = StepIO(s, model.device)
    prompts, lens = make_prompts(s, bs, seed + 1, model.device, 3, min(s.lmax // 4, 96))
    prefill_state(model, io, prompts, lens)
    reference = decode_plain(model, io, bs, s.block)
    gen = torch.Generator().manual_seed(seed)
    results = {}
    for mode in modes:
        for v in verify_lens:
            io.drafts[:bs].copy_(oracle_drafts(reference, None, s.vocab, s.block, gen))
            ref = model.reference_step(mode, v, io.prefix[:bs], io.bonus[:bs], io.drafts[:bs])
            model.step(io, mode, v, bs)
            got = io.outputs(bs, v + 1)
            cmp = compare_outputs(got, ref, exact=("accepted", "bonus", "t", "drafts"))
            cmp["drafts_agree"] = float((got["drafts"] == ref["drafts"]).float().mean())
            cmp["accepted"] = got["accepted"].tolist()
            results[f"{mode}-v{v}"] = cmp
    return results


def sdpa_probe(model: StaticLlama) -> str:
    """Whether SDPA's memory-efficient kernel takes the static model's attention (strided cache views, additive
    mask); if not, the MATH backend runs and every timing here is pessimistic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s, bs, W = model.shape, 2, 4
    g = s.heads // s.kv_heads
    q = torch.zeros(bs, s.kv_heads, g * W, s.head_dim, device=model.device, dtype=model.dtype)
    try:
        for keys in (s.lmax, model.slots):  # the verify forward's keys and the mask block's
            k = model.k_cache[0, :bs, :keys].transpose(1, 2)
            bias = model._bias(torch.ones(bs, W, keys, dtype=torch.bool, device=model.device))
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                F.scaled_dot_product_attention(q, k, k, attn_mask=bias)
    except RuntimeError as e:
        return f"MATH fallback (memory-efficient attention refused: {str(e)[:300]})"
    return "memory-efficient attention"


# ---- CUDA graph helpers ------------------------------------------------------------------------------------------
def capture(fn, pool) -> torch.cuda.CUDAGraph:
    """Warm up on a side stream (Triton compiles, cuBLAS picks its kernels), then capture one call of fn."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        fn()
    torch.cuda.synchronize()
    return graph


def time_replays(graph: torch.cuda.CUDAGraph, n: int) -> dict:
    """Median and min of n replays, each between two CUDA events."""
    graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    ms = [start.elapsed_time(end) for start, end in events]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms)}


def time_eager(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


# ---- check 1: calibration kernel ---------------------------------------------------------------------------------
def check_calibration(ctx: Context, entry: dict) -> None:
    from flexdraft_sgl.kernels.calibration import calibrate_reference, calibrate_triton

    H, r, V, V_padded = ctx.plan.calib_dims
    dt = torch.bfloat16 if ctx.cuda else torch.float32
    res = entry["results"]
    entry["shapes"] = dict(H=H, rank=r, vocab=V, logits_width=V_padded, dtype=str(dt))
    if not ctx.cuda:
        entry["skipped"] = {"triton": NO_CUDA, "timing": NO_CUDA}
        entry["final_status"] = "partial"
    for M in ctx.plan.calib_rows:
        ctx.budget.check(f"calibration M={M}")
        g = torch.Generator(device=ctx.device).manual_seed(ctx.args.seed + M)

        def randn(*size, scale=1.0):
            return torch.randn(*size, generator=g, device=ctx.device).mul_(scale)

        gold_mlp = CalibrationMLP(H, r, V).to(ctx.device).requires_grad_(False)
        with torch.no_grad():  # fresh random weights: a correction of about unit size (`down` is zero-initialised)
            gold_mlp.up.weight.copy_(randn(r, 2 * H, scale=(2 * H) ** -0.5))
            gold_mlp.up.bias.copy_(randn(r, scale=0.1))
            gold_mlp.down.weight.copy_(randn(V, r, scale=r**-0.5))
            gold_mlp.down.bias.copy_(randn(V, scale=0.1))
        mlp = CalibrationMLP(H, r, V).to(ctx.device, dt).requires_grad_(False)
        mlp.load_state_dict(gold_mlp.state_dict())
        # embeddings are ~20x smaller than final-normed hidden states; logits like a target's
        inputs = [randn(M, H, scale=0.02), randn(M, H), randn(M, V_padded, scale=3.0)]
        temps = torch.rand(M, generator=g, device=ctx.device) + 0.5
        low = [x.to(dt) for x in inputs]
        gold = calibrate_reference(gold_mlp, *[x.to(dt).float() for x in inputs], temps)
        ref = calibrate_reference(mlp, *low, temps)
        row = dict(M=M, reference_vs_gold=_calib_errors(ref, gold))
        if ctx.cuda:
            tri = calibrate_triton(mlp, *low, temps)
            tri_no_t = calibrate_triton(mlp, *low)
            row["triton_vs_reference"] = _calib_errors(tri, ref)
            row["triton_vs_gold"] = _calib_errors(tri, gold)
            row["no_temperature_same_as_with"] = bool(torch.equal(tri_no_t.tokens, tri.tokens)
                                                      and torch.equal(tri_no_t.logits, tri.logits))
            from triton.testing import do_bench

            for name, fn in dict(
                triton=lambda: calibrate_triton(mlp, *low), reference=lambda: calibrate_reference(mlp, *low),
                triton_probs=lambda: calibrate_triton(mlp, *low, temps),
                reference_probs=lambda: calibrate_reference(mlp, *low, temps),
            ).items():
                row[f"{name}_ms"] = do_bench(fn, warmup=10, rep=50, return_mode="median")
            row["speedup"] = row["reference_ms"] / row["triton_ms"]
            row["speedup_probs"] = row["reference_probs_ms"] / row["triton_probs_ms"]
        res[f"M{M}"] = row
        errs = row.get("triton_vs_reference", row["reference_vs_gold"])
        log(f"calibration M={M}: logits rel err {errs['logits_rel_err']:.2e}, token agreement "
            f"{errs['token_agreement']:.3f}; " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k.endswith("ms")))
        del gold_mlp, mlp, inputs, low, gold, ref
        ctx.recorder.write()


def _calib_errors(a, b) -> dict:
    out = dict(logits_rel_err=rel_err(a.logits, b.logits), logits_max_abs=float((a.logits - b.logits).abs().max()),
               token_agreement=float((a.tokens == b.tokens).float().mean()),
               top_max_abs=float((a.top - b.top).abs().max()))
    if a.probs is not None and b.probs is not None:
        out["probs_max_abs"] = float((a.probs - b.probs).abs().max())
        out["probs_rel_err"] = rel_err(a.probs, b.probs)
    return out


# ---- check 4: cost table -----------------------------------------------------------------------------------------
MADE_UP_TABLE = ForwardCostTable((1, 64, 128, 256, 512, 1024), (0.0060, 0.0066, 0.0075, 0.0110, 0.0190, 0.0350))


def check_cost_table(ctx: Context, entry: dict) -> None:
    res, s = entry["results"], ctx.plan.shape
    if not ctx.cuda:
        entry["skipped"] = {"forward_timing": NO_CUDA, "deep_pass_timing": NO_CUDA, "cost_table.json": NO_CUDA}
        entry["final_status"] = "partial"
        res["plan_decisions"] = plan_decisions(ctx.plan, MADE_UP_TABLE, "made-up (no CUDA)")
        return
    model = ctx.get_model()
    res["sdpa_backend"] = sdpa_probe(model)
    pool = torch.cuda.graph_pool_handle()
    n_bs = s.max_bs
    gen = torch.Generator(device=ctx.device).manual_seed(ctx.args.seed)
    tokens = torch.randint(0, s.vocab, (n_bs, max(ctx.plan.cost_rows) // n_bs + 1), generator=gen, device=ctx.device)
    prefix = torch.full((n_bs,), s.lmax // 4, dtype=torch.long, device=ctx.device)
    committed = prefix.clone()
    resolved = tokens[:, 0].clone()
    sink = torch.zeros(n_bs * (s.block + 1), dtype=torch.long, device=ctx.device)
    res["note"] = (f"attention spans all {s.lmax} cache slots of each request (masked), i.e. costs like a "
                   f"{s.lmax}-token context; rows spread as bs x width with bs = min(rows, {n_bs})")

    full = res["full_forward"] = {}
    for rows in ctx.plan.cost_rows:
        ctx.budget.check(f"cost table rows={rows}")
        bs = min(rows, n_bs)
        W = rows // bs

        def fn(bs=bs, W=W):
            sink[: bs * W].copy_(model.logits(model.forward(tokens[:bs, :W], prefix[:bs])).argmax(-1).view(-1))

        t0 = time.monotonic()
        graph = capture(fn, pool)
        timing = time_replays(graph, ctx.plan.replays)
        full[str(rows)] = dict(bs=bs, width=W, capture_s=time.monotonic() - t0, **timing)
        del graph
        log(f"full forward rows={rows} (bs {bs} x W {W}): {timing['median_ms']:.3f} ms")
    table = ForwardCostTable(tuple(int(r) for r in full), tuple(full[r]["median_ms"] / 1e3 for r in full))
    path = ctx.recorder.out / "cost_table.json"
    _atomic_write(path, table.to_json())
    assert ForwardCostTable.load(path) == table
    ctx.cost_table = table
    res["cost_table_file"] = path.name
    res["plan_decisions"] = plan_decisions(ctx.plan, table, "measured")
    ctx.recorder.write()

    deep = res["mask_block_pass"] = {}
    deep_weight = s.tuned / s.layers
    for bs in [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= n_bs]:
        ctx.budget.check(f"mask-block pass bs={bs}")
        rows = bs * s.block
        row = deep[str(rows)] = dict(bs=bs, n_over_l=deep_weight)
        for name, fn in dict(
            layers=lambda bs=bs: sink[: bs * s.block].copy_(model.deep_block(committed[:bs])[..., 0].reshape(-1) > 0),
            with_head_and_calibration=lambda bs=bs: sink[: bs * (s.block - 1)].copy_(
                model.draft(committed[:bs], resolved[:bs]).tokens.view(-1)),
        ).items():
            graph = capture(fn, pool)
            row[f"{name}_ms"] = time_replays(graph, ctx.plan.replays)["median_ms"]
            del graph
            # as SGLang's drafter runs it: eagerly, a launch per kernel (the worker does not capture this pass)
            row[f"{name}_eager_ms"] = statistics.median(time_eager(fn, ctx.device) for _ in range(ctx.plan.replays))
        full_ms = table.seconds_for(rows) * 1e3
        row["full_forward_ms_same_rows"] = full_ms
        row["ratio_layers"] = row["layers_ms"] / full_ms
        row["ratio_with_head"] = row["with_head_and_calibration_ms"] / full_ms
        row["ratio_with_head_eager"] = row["with_head_and_calibration_eager_ms"] / full_ms
        log(f"mask-block pass rows={rows}: {row['layers_ms']:.3f} ms (N layers), "
            f"{row['with_head_and_calibration_ms']:.3f} ms (+head, calibration), "
            f"{row['with_head_and_calibration_eager_ms']:.3f} ms eager; ratio {row['ratio_layers']:.3f} "
            f"vs N/L {deep_weight:.3f}")
        ctx.recorder.write()
    torch.cuda.empty_cache()


def plan_decisions(plan: Plan, table: ForwardCostTable, source: str) -> dict:
    """plan_step on `table` as the SGLang worker calls it (fused_parallel=False, the graph sets' verify tiers)."""
    s = plan.shape
    caps = verify_tiers(s.block - 1)
    rows = []
    for conf in plan.plan_conf:
        for bs in plan.plan_bs:
            top = torch.full((bs, s.block - 1), conf)
            p = plan_step(top, table, block_size=s.block, tuned_depth=s.tuned, num_layers=s.layers,
                          fused_parallel=False, verify_caps=caps)
            plain = plain_tokens_per_second(bs, table)
            rows.append(dict(confidence=conf, bs=bs, mode=p.mode.value, verify_len=int(p.verify_lens.max()),
                             tokens_per_s=p.tokens_per_second, plain_tokens_per_s=plain,
                             speedup=p.tokens_per_second / plain,
                             predicted={m.value: r for m, r in p.predicted.items()}))
    lines = [f"plan_step decisions on the {source} table (fused_parallel=False, caps {caps}):",
             f"{'conf':>5} {'bs':>4} {'mode':>10} {'v':>3} {'tok/s':>10} {'plain':>10} {'speedup':>7}"]
    lines += [f"{r['confidence']:>5} {r['bs']:>4} {r['mode']:>10} {r['verify_len']:>3} {r['tokens_per_s']:>10.1f} "
              f"{r['plain_tokens_per_s']:>10.1f} {r['speedup']:>7.2f}" for r in rows]
    print("\n".join(lines), flush=True)
    return dict(source=source, table=json.loads(table.to_json()), verify_caps=list(caps), rows=rows)


# ---- check 3: CUDA graphs of a FlexDraft step --------------------------------------------------------------------
def check_cuda_graphs(ctx: Context, entry: dict) -> None:
    res = entry["results"]
    small_device = ctx.device
    log("static step vs spec and lossless check on the small float32 model")
    small = StaticLlama(SMALL, small_device, seed=ctx.args.seed)
    res["spec_small_fp32"] = spec_check(small, verify_lens=(1, 3, 7), seed=ctx.args.seed)
    res["lossless_small_fp32"] = lossless_check(small, verify_lens=(1, 3, 7), seed=ctx.args.seed)
    del small
    ctx.recorder.write()

    model = ctx.get_model()
    s = model.shape
    if ctx.cuda:
        res["sdpa_backend"] = sdpa_probe(model)
    if ctx.cuda and s is FULL:
        ctx.budget.check("8B spec agreement")
        res["spec_8b_bf16_agreement"] = spec_check(model, verify_lens=(3, 15), bs=4, seed=ctx.args.seed)
        ctx.recorder.write()

    tiers = verify_tiers(s.block - 1)
    batch_sizes = ctx.plan.graph_bs
    res["graph_sets"] = {m: dict(verify_tiers=list(tiers), widths=list(widths_for_mode(m, tiers)))
                         for m in ("parallel", "sequential")}
    res["batch_buckets"] = {str(b): batch_bucket(b, batch_sizes) for b in (1, 2, 5, 8, 9, 20, 32, 33)}

    # Shared starting state: prompts of varied lengths cached, first tokens, plain greedy continuations (oracle).
    n = max(batch_sizes)
    io = StepIO(s, ctx.device)
    prompts, lens = make_prompts(s, n, ctx.args.seed + 2, ctx.device, s.lmax // 32, s.lmax // 10)
    prefill_state(model, io, prompts, lens)
    reference = decode_plain(model, io, n, s.block - 1)
    start = (io.prefix[:n].clone(), io.bonus[:n].clone())
    if ctx.cuda:
        snapshot = (model.k_cache[:, :n].clone(), model.v_cache[:, :n].clone())

    def reset_cache():
        if ctx.cuda:
            model.k_cache[:, :n].copy_(snapshot[0])
            model.v_cache[:, :n].copy_(snapshot[1])

    gen = torch.Generator().manual_seed(ctx.args.seed)

    def fresh_inputs(bs, oracle=True):
        drafts = (oracle_drafts(reference[:bs], None, s.vocab, s.block, gen) if oracle
                  else torch.randint(0, s.vocab, (bs, s.block - 1), generator=gen))
        io.load(start[0][:bs], start[1][:bs], drafts.to(ctx.device))

    keys = res["keys"] = {}
    plain = res["plain"] = {}
    if not ctx.cuda:
        entry["skipped"] = {"capture": NO_CUDA, "replay": NO_CUDA, "timing": NO_CUDA}
        entry["final_status"] = "partial"
    pool = torch.cuda.graph_pool_handle() if ctx.cuda else None

    for bs in batch_sizes:  # plain decoding's step first: the per-step baseline of every key
        ctx.budget.check(f"plain bs={bs}")
        row = plain[str(bs)] = {}
        fresh_inputs(bs)
        row["eager_ms"] = time_eager(lambda: model.plain_step(io, bs), ctx.device)
        if ctx.cuda:
            graph = capture(lambda bs=bs: model.plain_step(io, bs), pool)
            row.update(time_replays(graph, ctx.plan.replays))
            if ctx.cost_table is not None:
                row["predicted_ms"] = ctx.cost_table.seconds_for(bs) * 1e3
            del graph
        reset_cache()
        log(f"plain bs={bs}: {_fmt(row.get('median_ms'))} ms replay, {row['eager_ms']:.2f} ms eager")
    ctx.recorder.write()

    for mode in ("parallel", "sequential"):
        for v in tiers:
            for bs in batch_sizes:
                key = f"{mode}-v{v}-bs{bs}"
                ctx.budget.check(f"graph {key}", need=15.0)
                keys[key] = row = dict(mode=mode, verify_len=v, bs=bs, width=v + 1)
                try:
                    graph_key(ctx, model, io, row, mode, v, bs, pool, fresh_inputs, reset_cache,
                              plain[str(bs)].get("median_ms"))
                except Exception as e:  # recorded per key; the next key still runs
                    row["error"] = traceback.format_exc()
                    log(f"{key}: ERROR {type(e).__name__}: {e}")
                ctx.recorder.write()
    if ctx.cuda:
        try:
            padded_batch_check(ctx, model, io, res, pool, fresh_inputs, reset_cache)
        except Exception:  # an extra: recorded without failing the keys above
            res["padded_batch"] = {"error": traceback.format_exc()}
        del snapshot
        torch.cuda.empty_cache()
    bad = [k for k, r in keys.items()
           if "error" in r or (ctx.cuda and not r.get("replay_equals_eager", {}).get("exact"))]
    res["keys_not_exact_or_failed"] = bad
    if bad:
        entry["final_status"] = "failed"


def graph_key(ctx, model, io, row, mode, v, bs, pool, fresh_inputs, reset_cache, plain_ms) -> None:
    s, W = model.shape, v + 1
    fn = lambda: model.step(io, mode, v, bs)  # noqa: E731
    graph = None
    if ctx.cuda:
        fresh_inputs(bs, oracle=False)  # captured on other inputs than it replays: nothing is baked in
        t0 = time.monotonic()
        graph = capture(fn, pool)
        row["capture_s"] = time.monotonic() - t0
    reset_cache()
    fresh_inputs(bs)
    row["eager_ms"] = time_eager(fn, ctx.device)
    eager = io.outputs(bs, W)
    row["accepted"] = eager["accepted"].tolist()
    row["tokens_per_step"] = float(eager["accepted"].float().mean()) + (2 if mode == "sequential" else 1)
    if graph is not None:
        reset_cache()
        graph.replay()
        torch.cuda.synchronize()
        row["replay_equals_eager"] = compare_outputs(io.outputs(bs, W), eager)
        row.update(time_replays(graph, ctx.plan.replays))
        if plain_ms:  # plain decoding emits one token per step
            row["time_vs_plain"] = row["median_ms"] / plain_ms
            row["speedup_vs_plain"] = row["tokens_per_step"] / row["time_vs_plain"]
        if ctx.cost_table is not None:
            row["predicted_ms"] = 1e3 * step_seconds(
                Mode(mode), ctx.cost_table, batch_size=bs, full_rows=bs * W, block_size=s.block,
                deep_weight=s.tuned / s.layers, fused_parallel=False)
        del graph
    reset_cache()
    ok = row.get("replay_equals_eager", {}).get("exact")
    log(f"{mode} v={v} bs={bs}: capture {_fmt(row.get('capture_s'))} s, replay {_fmt(row.get('median_ms'))} ms, "
        f"eager {row['eager_ms']:.1f} ms, replay==eager {ok}, accepted {row['accepted'][:8]}")


def padded_batch_check(ctx, model, io, res, pool, fresh_inputs, reset_cache) -> None:
    """A batch smaller than its bucket (batch_bucket), padded as SGLang pads: the real requests' outputs from the
    bucket's graph against an eager step at the real size. Different GEMM shapes: agreement, not bitwise."""
    real, buckets = 5, ctx.plan.graph_bs
    bucket = batch_bucket(real, buckets)
    if bucket is None or bucket == real or bucket > max(buckets):
        return
    ctx.budget.check("padded batch", need=15.0)
    mode, v = "parallel", min(3, model.shape.block - 1)
    fresh_inputs(bucket)
    io.prefix[real:bucket].fill_(1)  # SGLang's padding: seq_len fill value 1, token 0
    io.bonus[real:bucket].zero_()
    io.drafts[real:bucket].zero_()
    graph = capture(lambda: model.step(io, mode, v, bucket), pool)
    reset_cache()
    graph.replay()
    torch.cuda.synchronize()
    padded = io.outputs(real, v + 1)
    reset_cache()
    model.step(io, mode, v, real)
    eager = io.outputs(real, v + 1)
    reset_cache()
    cmp = compare_outputs(padded, eager)
    cmp["drafts_agree"] = float((padded["drafts"] == eager["drafts"]).float().mean())
    res["padded_batch"] = dict(real_bs=real, bucket=bucket, mode=mode, verify_len=v, **cmp)
    del graph


# ---- check 2: FlashInfer custom-mask attention -------------------------------------------------------------------
def import_flashinfer(wheels: str | None):
    """flashinfer, or the reason it is not available. Wheels from --wheels go to a temporary --target dir first on
    sys.path."""
    try:
        import flashinfer

        return flashinfer, None
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        first = f"{type(e).__name__}: {e}"
    if not wheels:
        return None, first
    files = sorted(str(p) for p in Path(wheels).glob("*.whl"))
    if not files:
        return None, f"{first}; no .whl files in {wheels}"
    target = tempfile.mkdtemp(prefix="gpu_check_site_")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", target, *files], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"{first}; pip install of {len(files)} wheels failed: {proc.stderr[-2000:]}"
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    try:
        import flashinfer

        return flashinfer, None
    except Exception as e:  # noqa: BLE001
        return None, f"{first}; after installing {len(files)} wheels: {type(e).__name__}: {e}"


def check_flashinfer(ctx: Context, entry: dict) -> None:
    if not ctx.cuda:
        entry["final_status"], entry["reason"] = "skipped", NO_CUDA
        return
    flashinfer, why = import_flashinfer(ctx.args.wheels)
    if flashinfer is None:
        entry["final_status"], entry["reason"] = "skipped", f"skipped: FlashInfer not available ({why})"
        return
    from triton.testing import do_bench

    from flexdraft_sgl.kernels.mask_attention import (
        FlashInferMaskAttention, attention_reference_dense, attention_torch,
    )

    entry["flashinfer_version"] = getattr(flashinfer, "__version__", "?")
    res, dev = entry["results"], ctx.device
    hq, hkv, hd, B = 32, 8, 128, 16
    bs = 16 if not ctx.args.small else 4
    g = torch.Generator().manual_seed(ctx.args.seed)
    prefix = torch.randint(64, 1025, (bs,), generator=g)
    verify = torch.randint(1, B, (bs,), generator=g)
    verify[:4] = torch.tensor([1, 3, 7, 15])[: min(4, bs)]
    cases = {
        "parallel": parallel_layout(prefix, verify, B),
        "sequential_verify": verify_layout(prefix, verify, B),
        "draft_block_no_mask": None,
    }
    total = int(prefix.sum())
    slots = total + 4096
    k_buf = torch.randn(slots, hkv, hd, generator=g).to(dev, torch.bfloat16)
    v_buf = torch.randn(slots, hkv, hd, generator=g).to(dev, torch.bfloat16)
    kv_indices = torch.randperm(slots, generator=g)[:total].to(dev)  # shuffled pool slots
    kv_indptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(prefix, 0)]).to(dev)
    attn = FlashInferMaskAttention(dev)
    for name, layout in cases.items():
        ctx.budget.check(f"flashinfer {name}", need=20.0)
        if layout is None:  # the drafter's kept block: B rows per request, all seeing each other, mask None
            qo_indptr = torch.arange(bs + 1) * B
            pmax = int(prefix.max())
            dense = torch.cat([(torch.arange(pmax)[None, :] < prefix[:, None])[:, None].expand(bs, B, pmax),
                               torch.ones(bs, B, B, dtype=torch.bool)], 2)
            packed = flat = None
        else:
            qo_indptr = layout.request_row_start
            dense = dense_mask(layout)
            packed, flat = ragged_packed_mask(layout), ragged_mask(layout)[0].to(dev)
        rows = int(qo_indptr[-1])
        q = torch.randn(rows, hq, hd, generator=g).to(dev, torch.bfloat16)
        k = torch.randn(rows, hkv, hd, generator=g).to(dev, torch.bfloat16)
        v = torch.randn(rows, hkv, hd, generator=g).to(dev, torch.bfloat16)
        qo = qo_indptr.to(dev)
        t0 = time.monotonic()
        attn.plan(qo, kv_indptr, kv_indices, hq, hkv, hd, packed, q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16)
        out = attn.run(q, k, v, k_buf, v_buf)
        torch.cuda.synchronize()
        first_s = time.monotonic() - t0  # includes any JIT compile
        ref = attention_reference_dense(q.float(), k.float(), v.float(), qo, k_buf.float(), v_buf.float(), kv_indptr,
                                        kv_indices, dense.to(dev))
        args = (q, k, v, qo, k_buf, v_buf, kv_indptr, kv_indices)
        row = dict(bs=bs, rows=rows, prefix_tokens=total, first_call_s=first_s, rel_err=rel_err(out, ref),
                   max_abs=float((out.float() - ref).abs().max()),
                   torch_rel_err=rel_err(attention_torch(*args, flat), ref),
                   flashinfer_ms=do_bench(lambda: attn.run(q, k, v, k_buf, v_buf), warmup=10, rep=50,
                                          return_mode="median"),
                   torch_ms=do_bench(lambda: attention_torch(*args, flat), warmup=5, rep=30, return_mode="median"))
        row["speedup"] = row["torch_ms"] / row["flashinfer_ms"]
        res[name] = row
        log(f"flashinfer {name}: rel err {row['rel_err']:.2e}, {row['flashinfer_ms']:.3f} ms vs torch "
            f"{row['torch_ms']:.3f} ms")
        ctx.recorder.write()


# ---- summary -----------------------------------------------------------------------------------------------------
def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def summary_markdown(data: dict) -> str:
    meta, checks = data["meta"], data["checks"]
    parts = [f"# FlexDraft GPU check ({meta.get('size')})", "",
             f"device {meta.get('device_name')}, torch {meta.get('torch')}, triton {meta.get('triton')}, "
             f"python {meta.get('python')}; written {meta.get('written_at')}", "",
             f"Not covered: {NOT_COVERED}", ""]
    for name, c in checks.items():
        parts.append(f"## {name}: {c.get('status')} ({c.get('seconds', '-')} s)")
        for key in ("reason", "skipped"):
            if c.get(key):
                parts.append(f"- {key}: {c[key]}")
        if c.get("error"):
            parts.append("```\n" + c["error"][-3000:] + "\n```")
        r = c.get("results", {})
        try:
            parts.append(_summary_of(name, r))
        except Exception:  # noqa: BLE001 - a summary never breaks the run
            parts.append(f"(summary failed: {traceback.format_exc(limit=1)})")
        parts.append("")
    return "\n".join(parts) + "\n"


def _summary_of(name: str, r: dict) -> str:
    out = []
    if name == "calibration":
        rows = []
        for row in r.values():
            tr, tg, rg = (row.get(k, {}) for k in ("triton_vs_reference", "triton_vs_gold", "reference_vs_gold"))
            rows.append([row["M"], tr.get("logits_rel_err"), tr.get("token_agreement"), tr.get("top_max_abs"),
                         tr.get("probs_max_abs"), tg.get("logits_rel_err"), rg.get("logits_rel_err"),
                         row.get("triton_ms"), row.get("reference_ms"), row.get("speedup"), row.get("speedup_probs")])
        out.append(_table(["M", "logits rel err tri/ref", "token agree", "top err", "probs err", "tri/gold",
                           "ref/gold", "triton ms", "ref ms", "speedup", "speedup (probs)"], rows))
    elif name == "cost_table":
        if r.get("sdpa_backend"):
            out.append(f"- SDPA backend: {r['sdpa_backend']}\n")
        if r.get("full_forward"):
            out.append(_table(["rows", "bs x W", "median ms", "min ms"],
                              [[k, f"{v['bs']}x{v['width']}", v["median_ms"], v["min_ms"]]
                               for k, v in r["full_forward"].items()]))
        if r.get("mask_block_pass"):
            out.append("\nMask-block pass (N layers) against a full forward of the same rows (graph replay, and eager "
                       "as SGLang's drafter runs it; flex assumes N/L of the graphed forward):\n")
            out.append(_table(["rows", "N layers ms", "+head+calib ms", "eager +head+calib ms", "full ms", "ratio",
                               "ratio +head", "ratio eager", "N/L"],
                              [[k, v["layers_ms"], v["with_head_and_calibration_ms"],
                                v["with_head_and_calibration_eager_ms"], v["full_forward_ms_same_rows"],
                                v["ratio_layers"], v["ratio_with_head"], v["ratio_with_head_eager"], v["n_over_l"]]
                               for k, v in r["mask_block_pass"].items()]))
        if r.get("plan_decisions"):
            pd = r["plan_decisions"]
            out.append(f"\nplan_step on the {pd['source']} table (fused_parallel=False, caps {pd['verify_caps']}):\n")
            out.append(_table(["conf", "bs", "mode", "v", "tok/s", "plain tok/s", "speedup"],
                              [[x["confidence"], x["bs"], x["mode"], x["verify_len"], x["tokens_per_s"],
                                x["plain_tokens_per_s"], x["speedup"]] for x in pd["rows"]]))
    elif name == "cuda_graphs":
        for key, field in (("spec_small_fp32", "exact"), ("lossless_small_fp32", "lossless"),
                           ("spec_8b_bf16_agreement", "drafts_agree")):
            if key in r:
                out.append(f"- {key} ({field}): " + ", ".join(f"{k}: {_fmt(v.get(field))}" for k, v in r[key].items()))
        if r.get("sdpa_backend"):
            out.append(f"- SDPA backend: {r['sdpa_backend']}")
        if r.get("plain"):
            out.append("\nPlain decoding step:\n")
            out.append(_table(["bs", "replay ms", "eager ms", "predicted ms"],
                              [[k, v.get("median_ms"), v.get("eager_ms"), v.get("predicted_ms")]
                               for k, v in r["plain"].items()]))
        if r.get("keys"):
            out.append("\nFlexDraft step per graph key:\n")
            out.append(_table(
                ["key", "capture s", "replay ms", "eager ms", "predicted ms", "replay==eager", "logit diff",
                 "tokens/step", "time vs plain", "speedup vs plain", "error"],
                [[k, v.get("capture_s"), v.get("median_ms"), v.get("eager_ms"), v.get("predicted_ms"),
                  v.get("replay_equals_eager", {}).get("exact"),
                  max((x for n, x in v.get("replay_equals_eager", {}).items() if n.endswith("max_abs")), default=None),
                  v.get("tokens_per_step"), v.get("time_vs_plain"), v.get("speedup_vs_plain"),
                  "yes" if "error" in v else ""]
                 for k, v in r["keys"].items()]))
        if r.get("padded_batch"):
            out.append(f"\n- padded batch: {r['padded_batch']}")
    elif name == "flashinfer":
        out.append(_table(["case", "rows", "rel err", "torch rel err", "flashinfer ms", "torch ms", "speedup",
                           "first call s"],
                          [[k, v["rows"], v["rel_err"], v["torch_rel_err"], v["flashinfer_ms"], v["torch_ms"],
                            v["speedup"], v["first_call_s"]] for k, v in r.items()]))
    return "\n".join(out)


# ---- main --------------------------------------------------------------------------------------------------------
CHECKS = {  # run order: FlashInfer last (it may JIT-compile for minutes); the cost table before the graphs, which
    # compare each step's replay time with the table's prediction
    "calibration": check_calibration,
    "cost_table": check_cost_table,
    "cuda_graphs": check_cuda_graphs,
    "flashinfer": check_flashinfer,
}


def meta(args, device: torch.device) -> dict:
    info = dict(size="small" if args.small else "8b", not_covered=NOT_COVERED, seed=args.seed, budget_s=args.budget_s,
                python=platform.python_version(), torch=torch.__version__, device=str(device),
                shape=dataclasses.asdict(SMALL if args.small else FULL))
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001
        info["triton"] = f"not importable: {e}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count,
                    cuda=torch.version.cuda)
    else:
        info["device_name"] = "cpu"
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json, summary.md, cost_table.json")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke run (runs on CPU too)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop starting new work after this many s")
    parser.add_argument("--wheels", default=None, help="folder of .whl files (FlashInfer) to install for check 2")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated subset of " + ",".join(CHECKS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    budget = Budget(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.small:
        log("no CUDA: running the small shapes (an 8B model on CPU would take 16 GB and hours)")
        args.small = True
    torch.manual_seed(args.seed)
    recorder = Recorder(out, meta(args, device))
    ctx = Context(args, SMALL_PLAN if args.small else FULL_PLAN, device, budget, recorder)
    log(f"device {recorder.data['meta']['device_name']}, size {recorder.data['meta']['size']}, "
        f"budget {args.budget_s:.0f} s, out {out}")
    wanted = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = set(wanted) - set(CHECKS)
    if unknown:
        parser.error(f"unknown checks {sorted(unknown)}; choose from {', '.join(CHECKS)}")
    with torch.no_grad():
        for name in CHECKS:
            if name in wanted:
                recorder.run(name, CHECKS[name], ctx)
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("sglang", "transformers", "flashinfer"))
    recorder.data["meta"]["heavy_modules_imported"] = sorted({m.split(".")[0] for m in heavy})
    recorder.data["meta"]["total_s"] = round(time.monotonic() - budget.start, 1)
    recorder.write()
    statuses = {n: c["status"] for n, c in recorder.data["checks"].items()}
    log(f"done in {recorder.data['meta']['total_s']} s: {statuses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
