"""Reference engine: FlexDraft on a Hugging Face Llama-family target (Llama/SmolLM2, Qwen2, Qwen3), plain PyTorch.

The target's own modules (embedding, norms, projections, MLPs, rotary embedding, LM head) run row-wise over a flat,
request-major batch of rows; attention is SDPA under `core.masks.dense_mask` against a static per-request KV cache.
Every kind of forward (prefill, parallel step, sequential draft and verify, plain decoding) is the same `forward`
over a different `core.layout.StepLayout`, so the plain baseline and FlexDraft share one code path.

Only candidate rows write K/V (at their positions, before acceptance; a request's length then advances by the
accepted count, so rejected slots are simply overwritten later). Mask rows never touch the cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from ..adapter import FlexDraftAdapter, TargetSpec, vocab_digest
from ..core.acceptance import greedy_verify, speculative_verify
from ..core.confidence import verify_lengths
from ..core.layout import StepLayout, decode_layout, draft_layout, parallel_layout, prefill_layout, verify_layout
from ..core.masks import dense_mask, padded_rows
from ..core.policy import (COST_TABLE_ROWS, ForwardCostTable, Mode, cost_table_shapes, default_cost_table,
                           measure_cost_table, plan_step)
from ..core.sampling import (CalibratedDrafts, SamplingParams, draft_temperatures, draw, draw_drafts,
                             filtered_probs)
from ..kernels.calibration import calibrated_drafts

MODES = ("parallel", "sequential", "flex", "plain")


@dataclass
class RequestStats:
    prompt_tokens: int
    generated_tokens: int = 0
    decode_steps: int = 0  # parallel: forwards after prefill; sequential: verify+draft pairs; plain: forwards
    forwards: int = 0  # target forwards this request took part in, prefill included
    # One entry per forward: drafts accepted by its verification, or -1 for a forward that verified nothing (prefill,
    # sequential draft, plain decoding) and emitted exactly one token. Emitted tokens follow it in order.
    accepted_trace: list[int] = field(default_factory=list)
    shallow_rows: int = 0  # rows through the layers below the split
    deep_rows: int = 0  # rows through the final N layers (candidates plus mask rows)

    @property
    def tau(self) -> float:
        """Tokens per decode step (the first token, from prefill, is not a step's)."""
        return (self.generated_tokens - 1) / self.decode_steps if self.decode_steps else 0.0

    @property
    def accepted_hist(self) -> list[int]:
        """[a] = verify steps that accepted a drafts."""
        verified = [a for a in self.accepted_trace if a >= 0]
        return [verified.count(a) for a in range(max(verified, default=-1) + 1)]

    @property
    def mean_accepted(self) -> float:
        verified = [a for a in self.accepted_trace if a >= 0]
        return sum(verified) / len(verified) if verified else 0.0


@dataclass
class GenerationResult:
    tokens: list[int]
    finish_reason: str  # "stop" (a stop token, included) or "length"
    stats: RequestStats


class KVCache:
    """Per layer [batch, capacity, kv_heads, head_dim] for K and V; row b belongs to the b-th active request."""

    def __init__(self, num_layers: int, batch: int, capacity: int, kv_heads: int, head_dim: int, dtype, device):
        shape = (batch, capacity, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def keep(self, index: Tensor) -> None:
        self.k = [t[index] for t in self.k]
        self.v = [t[index] for t in self.v]


@dataclass
class _Context:
    """Per-forward attention inputs shared by every layer of one layout."""

    layout: StepLayout
    mask: Tensor  # [bs, 1, Wmax, Pmax + Wmax]
    index: Tensor  # [bs, Wmax] flat row of each padded slot
    valid: Tensor  # [bs, Wmax]
    cos: Tensor
    sin: Tensor
    candidate_rows: Tensor
    mask_rows: Tensor
    pmax: int


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [R, heads, hd], cos/sin [R, hd]: the targets' rotary arithmetic, row-wise."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class ReferenceEngine:
    def __init__(self, model, adapter: FlexDraftAdapter | None = None, tokenizer=None,
                 cost_table: ForwardCostTable | None = None):
        self.model = model.eval()
        self.spec = TargetSpec.from_hf_config(model.config)
        if adapter is not None:
            adapter.config.check_target(self.spec, vocab_digest(tokenizer) if tokenizer is not None else None)
        self.adapter = adapter
        core = model.model
        self.embed, self.layers, self.norm, self.rotary = core.embed_tokens, core.layers, core.norm, core.rotary_emb
        self.lm_head = model.lm_head
        self.cost_table = cost_table or default_cost_table()
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.checkpoint_layers = False  # gradient checkpointing of the deep layers (training)

    @property
    def block_size(self) -> int:
        return self.adapter.config.block_size if self.adapter is not None else 1

    @property
    def split_layer(self) -> int:
        return self.adapter.config.split_layer if self.adapter is not None else self.spec.num_layers

    # ---- one forward -------------------------------------------------------------------------------------------
    def new_cache(self, batch: int, capacity: int) -> KVCache:
        s = self.spec
        return KVCache(s.num_layers, batch, capacity, s.num_kv_heads, s.head_dim, self.dtype, self.device)

    def _context(self, layout: StepLayout, like: Tensor) -> _Context:
        index, valid = padded_rows(layout)
        cos, sin = self.rotary(like, layout.row_position[None])
        pmax = int(layout.prefix_lens.max())
        return _Context(layout, dense_mask(layout)[:, None], index, valid, cos[0], sin[0],
                        layout.candidate_rows, layout.mask_rows, pmax)

    @staticmethod
    def _qkv(attn, h: Tensor, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
        q = attn.q_proj(h).view(len(h), -1, head_dim)
        k = attn.k_proj(h).view(len(h), -1, head_dim)
        v = attn.v_proj(h).view(len(h), -1, head_dim)
        if getattr(attn, "q_norm", None) is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        return q, k, v

    def _layer(self, index: int, x: Tensor, ctx: _Context, cache: KVCache) -> Tensor:
        layer = self.layers[index]
        attn = layer.self_attn
        hd = self.spec.head_dim
        h = layer.input_layernorm(x)
        c, m = ctx.candidate_rows, ctx.mask_rows
        tuned = self.adapter.attention[index - self.split_layer] if len(m) else None
        if tuned is None:
            q, k, v = self._qkv(attn, h, hd)
        else:  # candidate rows: the target's projectors; mask rows: the adapter's
            qc, kc, vc = self._qkv(attn, h[c], hd)
            qm, km, vm = self._qkv(tuned, h[m], hd)
            q = qc.new_empty(len(h), qc.shape[1], hd)  # qc's dtype: bfloat16 under training's autocast
            k = kc.new_empty(len(h), kc.shape[1], hd)
            v = torch.empty_like(k)
            q[c], k[c], v[c], q[m], k[m], v[m] = qc, kc, vc, qm, km, vm
        q, k = _rope(q, ctx.cos, ctx.sin), _rope(k, ctx.cos, ctx.sin)

        if cache is None:  # a layout without prefix, nothing kept (training)
            keys, values = k[ctx.index].transpose(1, 2), v[ctx.index].transpose(1, 2)
        else:
            layout = ctx.layout
            req, pos = layout.row_request[c], layout.row_position[c]
            cache.k[index][req, pos] = k[c]
            cache.v[index][req, pos] = v[c]
            keys = torch.cat([cache.k[index][:, : ctx.pmax], k[ctx.index]], 1).transpose(1, 2)
            values = torch.cat([cache.v[index][:, : ctx.pmax], v[ctx.index]], 1).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q[ctx.index].transpose(1, 2), keys.to(q.dtype), values.to(q.dtype), attn_mask=ctx.mask,
            scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1],
        )
        out = out.transpose(1, 2)[ctx.valid].reshape(len(h), -1)
        if tuned is None:
            o = attn.o_proj(out)
        else:
            oc = attn.o_proj(out[c])
            o = oc.new_empty(len(h), oc.shape[1])
            o[c], o[m] = oc, tuned.o_proj(out[m])
        x = x + o
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def forward(self, layout: StepLayout, tokens: Tensor, cache: KVCache | None,
                split_hidden: Tensor | None = None) -> Tensor:
        """Run one step: `tokens` are the candidate rows' tokens in flat order. Returns the last layer's hidden
        states (before the final norm) for every row of `layout`, in its flat order. `cache` None: a layout without
        a cached prefix whose K/V are not kept (training). `split_hidden`: what `split_hidden_states` returns for
        these candidate rows, computed earlier (training caches it), so the layers below the split are skipped."""
        if split_hidden is None:
            x, ctx = self._shallow(layout, tokens, cache)
        else:
            x, ctx = split_hidden, None
        if layout.has_blocks:  # mask rows enter here, laid out block by block, rows 0..B-1 each
            deep = x.new_empty(layout.num_rows, x.shape[1])
            deep[layout.candidate_rows] = x
            deep[layout.mask_rows] = self.adapter.mask_embedding.to(x.dtype).repeat(len(layout.block_request), 1)
            x, ctx = deep, self._context(layout, deep)
        elif ctx is None:
            ctx = self._context(layout.candidates_only(), x)
        for i in range(self.split_layer, self.spec.num_layers):
            x = self._checkpointed_layer(i, x, ctx, cache) if self.checkpoint_layers else self._layer(i, x, ctx, cache)
        return x

    def split_hidden_states(self, layout: StepLayout, tokens: Tensor, cache: KVCache | None) -> Tensor:
        """The candidate rows' hidden states entering the split layer s = L - N, i.e. the output of layers 0..s-1,
        whatever `layout` holds: exactly what decoding feeds the deep layers, and so what training must cache."""
        return self._shallow(layout, tokens, cache)[0]

    def _shallow(self, layout: StepLayout, tokens: Tensor, cache: KVCache | None) -> tuple[Tensor, _Context]:
        shallow = layout.candidates_only()
        x = self.embed(tokens)
        ctx = self._context(shallow, x)
        for i in range(self.split_layer):
            x = self._layer(i, x, ctx, cache)
        return x, ctx

    def _checkpointed_layer(self, i: int, x: Tensor, ctx: _Context, cache: KVCache | None) -> Tensor:
        # Recomputed in the backward pass instead of keeping activations (large targets); needs cache None.
        return torch.utils.checkpoint.checkpoint(self._layer, i, x, ctx, cache, use_reentrant=False)

    def measure_cost_table(self, rows=COST_TABLE_ROWS, prefix_len: int = 64, repeats: int = 3,
                           width: int = 16) -> ForwardCostTable:
        """Time full-depth forwards against row count on this machine: the table the flex policy reads. Each entry
        is one-row requests or requests of `width` verify rows (`policy.cost_table_shapes`), each after a
        `prefix_len`-token cache, the shape of a plain or a verify step."""
        def prepare(requests: int, rows_each: int):
            cache = self.new_cache(requests, prefix_len + rows_each + 1)
            layout = verify_layout([prefix_len] * requests, [rows_each - 1] * requests, 2)
            tokens = torch.zeros(requests * rows_each, dtype=torch.long, device=self.device)

            @torch.inference_mode()
            def forward():
                self.forward(layout, tokens, cache)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
            return forward

        return measure_cost_table(prepare, cost_table_shapes(rows, width), repeats)

    # ---- heads -------------------------------------------------------------------------------------------------
    def target_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.norm(hidden))

    @functools.cached_property
    def draft_head(self):
        """The LM head drafts read: the target's, restricted to the adapter's draft vocabulary if it has one (its rows
        gathered once, as the SGLang drafter does, not at every draft step)."""
        return self.adapter.draft_head(self.lm_head.weight)

    def draft_logits(self, hidden: Tensor, bonus: Tensor) -> Tensor:
        """Calibrated draft logits for mask rows 1..B-1. hidden [bs, B-1, H] (pre-norm), bonus [bs]: the token
        resolved at the block's row 0."""
        h = self.norm(hidden)
        return self.adapter.calibration.logits(self.embed(bonus)[:, None].expand_as(h), h, self.draft_head)

    def calibrated_drafts(self, hidden: Tensor, bonus: Tensor, temperatures: Tensor | None) -> CalibratedDrafts:
        """What decoding reads from the draft logits of `draft_logits` (argmax, confidence, distribution), in one
        pass through the calibration kernel on a GPU."""
        h = self.norm(hidden)
        return calibrated_drafts(self.adapter.calibration, self.embed(bonus)[:, None].expand_as(h), h,
                                 self.draft_head, temperatures)

    # ---- generation --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: list[list[int]],
        *,
        max_new_tokens: int = 128,
        mode: str = "parallel",
        sampling: SamplingParams | None = None,
        stop_token_ids=(),
        verify_len: int | None = None,
        seed: int = 0,
    ) -> list[GenerationResult]:
        """Generate for a batch of token-id prompts. mode: parallel | sequential | flex | plain. verify_len fixes how
        many drafts each step verifies; by default the adapter's confidence rule decides."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode != "plain" and self.adapter is None:
            raise ValueError(f"mode {mode!r} needs an adapter; only 'plain' runs without one")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if verify_len is not None and verify_len < 1:
            raise ValueError("verify_len must be at least 1")
        run = _Run(self, prompts, max_new_tokens, mode, sampling, stop_token_ids, verify_len, seed)
        return run.go()


class _Run:
    """State of one `generate` call. Tensors hold the still-active requests only; `ids` maps them to prompts."""

    def __init__(self, engine: ReferenceEngine, prompts, max_new_tokens, mode, sampling, stop_token_ids, verify_len,
                 seed):
        self.e = engine
        self.mode = mode
        self.speculative = mode != "plain"
        self.max_new = max_new_tokens
        self.stop = set(int(t) for t in stop_token_ids)
        self.B = engine.block_size
        self.verify_len = None if verify_len is None else min(verify_len, self.B - 1)
        bs = len(prompts)
        self.prompts = prompts
        self.params = sampling if sampling is not None else SamplingParams.make(bs)
        if len(self.params.temperature) != bs:
            raise ValueError("sampling params must have one entry per prompt")
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self.ids = torch.arange(bs)
        self.outputs: list[list[int]] = [[] for _ in range(bs)]
        self.finish: list[str | None] = [None] * bs
        self.stats = [RequestStats(prompt_tokens=len(p)) for p in prompts]
        capacity = max(len(p) for p in prompts) + max_new_tokens + 2 * self.B + 2
        self.cache = engine.new_cache(bs, capacity)
        self.lens = torch.tensor([len(p) for p in prompts])
        self.bonus = None
        self.drafts = self.draft_q = self.draft_top = None

    # ---- bookkeeping -------------------------------------------------------------------------------------------
    def _count(self, layout: StepLayout, decode_step: bool, accepted: Tensor | None = None) -> None:
        shallow = layout.num_candidates.tolist()
        deep = layout.rows_per_request.tolist() if layout.has_blocks else shallow
        trace = accepted.tolist() if accepted is not None else [-1] * len(shallow)
        for j, i in enumerate(self.ids.tolist()):
            s = self.stats[i]
            s.forwards += 1
            s.decode_steps += decode_step
            s.shallow_rows += shallow[j]
            s.deep_rows += deep[j]
            s.accepted_trace.append(trace[j])

    def _emit(self, per_request: list[list[int]]) -> None:
        """Append each active request's new tokens, stopping at a stop token (kept) or at max_new_tokens; then drop
        finished requests from every batched tensor."""
        for j, i in enumerate(self.ids.tolist()):
            out = self.outputs[i]
            for t in per_request[j]:
                out.append(t)
                self.stats[i].generated_tokens += 1
                if t in self.stop:
                    self.finish[i] = "stop"
                elif len(out) >= self.max_new:
                    self.finish[i] = "length"
                if self.finish[i]:
                    break
        alive = torch.tensor([self.finish[i] is None for i in self.ids.tolist()])
        if not alive.all():
            keep = torch.nonzero(alive).flatten()
            self.ids, self.lens, self.bonus = self.ids[keep], self.lens[keep], self.bonus[keep]
            self.params = self.params.select(keep)
            self.cache.keep(keep)
            for name in ("drafts", "draft_q", "draft_top"):
                if getattr(self, name) is not None:
                    setattr(self, name, getattr(self, name)[keep])

    @property
    def active(self) -> bool:
        return len(self.ids) > 0

    # ---- pieces of a step --------------------------------------------------------------------------------------
    def _sample_target(self, logits: Tensor) -> Tensor:
        return draw(logits, self.params, self.gen, self.params.all_greedy)

    def _draft_from(self, hidden: Tensor, layout: StepLayout, anchors: Tensor, bonus: Tensor) -> None:
        """Keep the block anchored after `anchors` (per request), calibrate its rows 1..B-1 with the resolved bonus,
        and draw the next drafts from it."""
        rows = layout.block_rows(layout.block_after(anchors))[:, 1:]
        greedy = self.params.all_greedy
        calibrated = self.e.calibrated_drafts(hidden[rows], bonus, draft_temperatures(self.params, greedy))
        self.drafts, self.draft_q, self.draft_top = draw_drafts(calibrated, self.params, self.gen, greedy)

    def _verify_lens(self) -> Tensor:
        if self.verify_len is not None:
            return torch.full((len(self.ids),), self.verify_len)
        cfg = self.e.adapter.config
        return verify_lengths(self.draft_top, cfg.verify_rule, cfg.verify_threshold, max_len=self.B - 1)

    def _candidates(self, verify: Tensor) -> tuple[Tensor, Tensor]:
        """Flat candidate tokens [c0, d1..dv] per request, and the [bs, D] drafts being verified (D = max v)."""
        width = int(verify.max())
        block = torch.cat([self.bonus[:, None], self.drafts[:, :width]], 1)
        take = torch.arange(width + 1)[None, :] <= verify[:, None]
        return block[take], block[:, 1:]

    def _accept(self, hidden: Tensor, layout: StepLayout, drafts: Tensor, verify: Tensor) -> tuple[Tensor, Tensor]:
        width = drafts.shape[1]
        j = torch.arange(width + 1)[None, :].minimum(verify[:, None])
        rows = layout.request_row_start[:-1, None] + j  # candidate j of each request (clamped to its own v)
        logits = self.e.target_logits(hidden[rows])
        if self.params.all_greedy:
            return greedy_verify(drafts, logits.argmax(-1), verify)
        p = filtered_probs(logits, self.params)
        return speculative_verify(drafts, self.draft_q[:, :width], p, verify, self.gen)

    def _commit_and_emit(self, drafts: Tensor, accepted: Tensor, bonus: Tensor) -> None:
        emitted = [drafts[j, :a].tolist() + [int(bonus[j])] for j, a in enumerate(accepted.tolist())]
        self.lens = self.lens + accepted + 1
        self.bonus = bonus
        self._emit(emitted)

    # ---- steps -------------------------------------------------------------------------------------------------
    def prefill(self) -> None:
        layout = prefill_layout(self.lens, self.B, with_block=self.speculative)
        tokens = torch.tensor([t for p in self.prompts for t in p])
        hidden = self.e.forward(layout, tokens, self.cache)
        self._count(layout, decode_step=False)
        first = self._sample_target(self.e.target_logits(hidden[layout.last_candidate_rows()]))
        if self.speculative:
            self._draft_from(hidden, layout, layout.num_candidates - 1, first)
        self.bonus = first
        self._emit([[int(t)] for t in first])

    def plain_step(self) -> None:
        layout = decode_layout(self.lens, self.B)
        hidden = self.e.forward(layout, self.bonus, self.cache)
        self._count(layout, decode_step=True)
        token = self._sample_target(self.e.target_logits(hidden))
        self.lens = self.lens + 1
        self.bonus = token
        self._emit([[int(t)] for t in token])

    def _verify_forward(self, layout: StepLayout, verify: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        tokens, drafts = self._candidates(verify)
        hidden = self.e.forward(layout, tokens, self.cache)
        accepted, bonus = self._accept(hidden, layout, drafts, verify)
        self._count(layout, decode_step=True, accepted=accepted)
        return hidden, drafts, accepted, bonus

    def parallel_step(self, verify: Tensor) -> None:
        layout = parallel_layout(self.lens, verify, self.B)
        hidden, drafts, accepted, bonus = self._verify_forward(layout, verify)
        self._draft_from(hidden, layout, accepted, bonus)  # block k = "k drafts accepted"
        self._commit_and_emit(drafts, accepted, bonus)

    def sequential_step(self, verify: Tensor) -> None:
        _, drafts, accepted, bonus = self._verify_forward(verify_layout(self.lens, verify, self.B), verify)
        self._commit_and_emit(drafts, accepted, bonus)
        if not self.active:
            return
        # Draft forward: the bonus at full depth gives the next exact token t; the block after it, calibrated with
        # t, gives the drafts that follow t.
        layout = draft_layout(self.lens, self.B)
        hidden = self.e.forward(layout, self.bonus, self.cache)
        self._count(layout, decode_step=False)
        token = self._sample_target(self.e.target_logits(hidden[layout.last_candidate_rows()]))
        self._draft_from(hidden, layout, torch.zeros_like(token), token)
        self.lens = self.lens + 1
        self.bonus = token
        self._emit([[int(t)] for t in token])

    def go(self) -> list[GenerationResult]:
        self.prefill()
        while self.active:
            if self.mode == "plain":
                self.plain_step()
                continue
            verify = self._verify_lens()
            mode = self.mode
            if mode == "flex":
                cfg = self.e.adapter.config
                plan = plan_step(
                    self.draft_top, self.e.cost_table, block_size=self.B, tuned_depth=cfg.tuned_depth,
                    num_layers=self.e.spec.num_layers, rule=cfg.verify_rule, threshold=cfg.verify_threshold,
                )
                if plan.mode is Mode.PLAIN:  # drafting does not pay at this batch: keep the drafts, decode plainly
                    self.plain_step()
                    continue
                mode = plan.mode.value
                if self.verify_len is None:
                    verify = plan.verify_lens
            if mode == Mode.PARALLEL.value:
                self.parallel_step(verify)
            else:
                self.sequential_step(verify)
        return [GenerationResult(o, f, s) for o, f, s in zip(self.outputs, self.finish, self.stats)]
