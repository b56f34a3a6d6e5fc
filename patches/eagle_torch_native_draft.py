"""EAGLE drafting (EAGLE, EAGLE3, STANDALONE) on SGLang's `torch_native` attention backend, the only one on CPU.

Covers `sglang.srt.speculative.draft_utils.DraftBackendFactory._create_backend` (SGLang 0.5.23): neither of its
backend maps, the multi-step draft-decode one (`create_decode_backend`) and the draft-extend one
(`create_draft_extend_backend`), has a torch_native entry, so the workers refuse to start ("EAGLE is not supported in
... attention backend torch_native"). The AROUND hook adds that entry to both maps:

- draft extend: a plain `TorchNativeAttnBackend`. Its causal extend attention is what draft extend needs: each
  request extends by its verify window after its committed prefix (`prepare_for_draft_extend` sets the lengths);
- draft decode: `TorchNativeMultiStepDraftBackend`, one `TorchNativeDraftStepBackend` per draft step. The stock
  `forward_decode` would read `forward_batch.seq_lens`, which stays at the committed length in every step, so a draft
  step would not see itself nor the earlier drafts. Step s instead gives row (request b, branch k) the committed KV
  of b plus the slots of branch k's drafts 0..s, the layout of SGLang's own multi-step backends
  (`generate_draft_decode_kv_indices`, sglang/kernels/ops/speculative/cache_locs.py; `assign_draft_cache_locs_
  contiguous` gives branch k of b the slots seq_len + k * num_steps + [0, num_steps)). topk > 1 works the same way.

Only `flexdraft_sgl.sglang.cpu.install()` registers it (no GPU); it keeps any torch_native entry SGLang may gain.
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch.nn.functional import scaled_dot_product_attention

from . import register

FACTORY = "sglang.srt.speculative.draft_utils.DraftBackendFactory"


def draft_kv_indices(req_to_token, req_pool_indices, seq_lens, topk: int, num_steps: int, step: int):
    """KV slots read by draft step `step` (0-based), one row per (request, branch), request-major:
    ([bs * topk, width] int64 slots, [bs * topk, width] bool valid), padded to the longest row."""
    seq = seq_lens.long().repeat_interleave(topk)[:, None]
    branch = torch.arange(topk, device=seq.device).repeat(len(seq_lens))[:, None]
    col = torch.arange(int(seq_lens.max()) + step + 1, device=seq.device)[None, :]
    src = torch.where(col < seq, col, seq + branch * num_steps + (col - seq))
    valid = col < seq + step + 1
    rows = req_to_token[req_pool_indices.long()].repeat_interleave(topk, 0)
    return rows.gather(1, torch.where(valid, src, 0)).long(), valid


class TorchNativeDraftStepBackend(TorchNativeAttnBackend):
    """One draft-decode step: writes the step's K/V, then each query row attends to its own KV slots."""

    kv_indices: torch.Tensor | None = None  # [rows, width], set per forward by TorchNativeMultiStepDraftBackend
    kv_valid: torch.Tensor | None = None

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
            raise NotImplementedError("EAGLE draft decode on torch_native does not support sliding-window layers")
        pool = self.token_to_kv_pool
        if save_kv_cache and k is not None and v is not None:
            pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, None), k, v)  # rows see themselves
        heads = layer.tp_q_head_num
        q = q.reshape(-1, heads, layer.qk_head_dim).unsqueeze(2)  # [rows, heads, 1, dim]
        keys = pool.get_key_buffer(layer.layer_id)[self.kv_indices].to(q.dtype).transpose(1, 2)
        values = pool.get_value_buffer(layer.layer_id)[self.kv_indices].to(q.dtype).transpose(1, 2)
        out = scaled_dot_product_attention(q, keys, values, attn_mask=self.kv_valid[:, None, None, :],
                                           scale=layer.scaling, enable_gqa=heads != layer.tp_k_head_num)
        return out.reshape(q.shape[0], heads * layer.v_head_dim)


class TorchNativeMultiStepDraftBackend:
    """The per-step backends of one draft-decode pass (the interface of SGLang's `*MultiStepDraftBackend`s)."""

    def __init__(self, model_runner, topk: int, num_steps: int):
        if topk > 1 and model_runner.page_size > 1:
            raise NotImplementedError("EAGLE topk > 1 on torch_native needs --page-size 1")
        self.topk, self.num_steps = topk, num_steps
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.attn_backends = [TorchNativeDraftStepBackend(model_runner) for _ in range(num_steps - 1)]

    def init_forward_metadata(self, forward_batch):
        for step, backend in enumerate(self.attn_backends):
            backend.kv_indices, backend.kv_valid = draft_kv_indices(
                self.req_to_token, forward_batch.req_pool_indices, forward_batch.seq_lens, self.topk,
                self.num_steps, step)


def _around_create_backend(original, factory, backend_name, backend_map, error_template, stamps_children=False):
    def torch_native():
        runner = factory.draft_model_runner
        if stamps_children:  # the multi-step draft-decode map
            return "torch_native", TorchNativeMultiStepDraftBackend(runner, factory.topk, factory.speculative_num_steps)
        return "torch_native", TorchNativeAttnBackend(runner)

    return original(factory, backend_name, {"torch_native": torch_native, **backend_map}, error_template,
                    stamps_children=stamps_children)


def register_hooks() -> None:
    """Register the hook with SGLang's HookRegistry (applied by `load_plugins`); idempotent."""
    register(f"{FACTORY}._create_backend", _around_create_backend, "AROUND")
