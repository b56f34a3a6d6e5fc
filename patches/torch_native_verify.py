"""TARGET_VERIFY (custom-mask) attention for SGLang's `torch_native` backend, the only attention backend on CPU.

Covers `sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend` (SGLang 0.5.23). Its
`forward_extend` only knows causal prefill: in TARGET_VERIFY mode `extend_seq_lens` / `extend_prefix_lens` are None
and `spec_info.custom_mask` is never read, so every speculative algorithm fails at its first verify on CPU. Two hooks
fix that without editing SGLang:

- AFTER `init_forward_metadata`: in TARGET_VERIFY mode compute, once per forward, each request's KV read indices and
  boolean attention mask (`prepare_verify_metadata`) and keep them in `backend.verify_metadata`; None otherwise.
- AROUND `forward_extend`: TARGET_VERIFY goes to `verify_attention`, which writes the W new K/V rows and runs SDPA
  per request with that mask; every other mode runs the original.

A TARGET_VERIFY batch has W query rows per request (request-major); `seq_lens` excludes them and row 0's KV (the last
committed token) is written in this very pass, so the rows read `seq_len + W` KV entries. `spec_info.custom_mask`
comes either as W x W per request (QLEN_ONLY; what NGRAM builds on CPU) or as W x (seq_len + W) per request
(FULL_MASK); the element count tells them apart. Without a custom mask the rows form a causal chain.

Both functions are public so that a worker can run a verify-like forward with its own ForwardBatch (for example a
different set of rows in some layers): `prepare_verify_metadata(backend, forward_batch)` and
`verify_attention(q, k, v, layer, metadata)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.functional import scaled_dot_product_attention

from . import register

BACKEND = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"


@dataclass
class VerifyMetadata:
    """What every layer of one verify forward needs: W query rows per request, request-major."""

    rows_per_request: int
    kv_indices: list[torch.Tensor]  # per request: int64 KV slots read, seq_len + W of them
    masks: list[torch.Tensor | None]  # per request: bool [W, seq_len + W], True = may attend; None = all
    write_loc: object  # KVWriteLoc of the W*bs new rows
    kv_pool: object  # the backend's token_to_kv_pool


def _request_masks(custom_mask, seq_lens: list[int], w: int, device=None) -> list[torch.Tensor | None]:
    if custom_mask is None and w == 1:  # one row sees its whole prefix and itself: SDPA needs no mask
        return [None] * len(seq_lens)
    if custom_mask is None:
        return [torch.ones(w, n + w, dtype=torch.bool, device=device).tril(n) for n in seq_lens]
    mask = custom_mask.flatten().bool()
    if mask.numel() == len(seq_lens) * w * w:  # QLEN_ONLY: the prefix is always visible
        return [torch.cat([mask.new_ones(w, n), mask[i * w * w : (i + 1) * w * w].view(w, w)], 1)
                for i, n in enumerate(seq_lens)]
    if mask.numel() < w * (sum(seq_lens) + len(seq_lens) * w):
        raise ValueError(f"custom_mask has {mask.numel()} entries: neither QLEN_ONLY nor FULL_MASK for "
                         f"W={w}, seq_lens={seq_lens}")
    masks, start = [], 0
    for n in seq_lens:  # FULL_MASK, possibly padded at the end
        masks.append(mask[start : start + w * (n + w)].view(w, n + w))
        start += w * (n + w)
    return masks


def prepare_verify_metadata(backend, forward_batch) -> VerifyMetadata:
    """KV read indices, masks and write location of a verify forward: once per ForwardBatch, reused by every layer.
    W = out_cache_loc entries per request; the mask comes from `forward_batch.spec_info.custom_mask` (None: causal)."""
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    bs = forward_batch.batch_size
    w = forward_batch.out_cache_loc.numel() // bs
    seq_lens = forward_batch.seq_lens[:bs].tolist()
    pool_rows = backend.req_to_token_pool.req_to_token[forward_batch.req_pool_indices[:bs].long()]
    spec_info = forward_batch.spec_info
    return VerifyMetadata(
        rows_per_request=w,
        kv_indices=[pool_rows[i, : n + w].long() for i, n in enumerate(seq_lens)],
        masks=_request_masks(getattr(spec_info, "custom_mask", None), seq_lens, w, forward_batch.seq_lens.device),
        write_loc=KVWriteLoc(forward_batch.out_cache_loc, backend.swa_out_cache_loc),
        kv_pool=backend.token_to_kv_pool,
    )


def verify_attention(q, k, v, layer, metadata: VerifyMetadata, save_kv_cache: bool = True):
    """One layer's verify attention: store the new rows' K/V, then each request's W query rows attend to its
    seq_len + W KV entries under its mask. Returns [bs * W, heads * v_head_dim]."""
    if layer.sliding_window_size is not None and layer.sliding_window_size > -1:
        raise NotImplementedError("verify attention on torch_native does not support sliding-window layers")
    pool, w = metadata.kv_pool, metadata.rows_per_request
    if save_kv_cache and k is not None and v is not None:
        pool.set_kv_buffer(layer, metadata.write_loc, k, v)  # before reading: the rows attend to themselves
    k_cache, v_cache = pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id)
    heads = layer.tp_q_head_num
    q = q.reshape(-1, heads, layer.qk_head_dim)
    out = q.new_empty(q.shape[0], heads, layer.v_head_dim)
    for i, (kv, mask) in enumerate(zip(metadata.kv_indices, metadata.masks)):
        rows = slice(i * w, (i + 1) * w)
        out[rows] = scaled_dot_product_attention(
            q[rows].transpose(0, 1).unsqueeze(0),
            k_cache[kv].to(q.dtype).transpose(0, 1).unsqueeze(0),
            v_cache[kv].to(q.dtype).transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            scale=layer.scaling,
            enable_gqa=heads != layer.tp_k_head_num,
        )[0].transpose(0, 1)
    return out.view(q.shape[0], heads * layer.v_head_dim)


def _after_init_forward_metadata(result, backend, forward_batch):
    is_verify = forward_batch.forward_mode.is_target_verify()
    backend.verify_metadata = prepare_verify_metadata(backend, forward_batch) if is_verify else None
    return result


def _around_forward_extend(original, backend, q, k, v, layer, forward_batch, save_kv_cache=True):
    if not forward_batch.forward_mode.is_target_verify():
        return original(backend, q, k, v, layer, forward_batch, save_kv_cache)
    metadata = getattr(backend, "verify_metadata", None)
    if metadata is None:
        raise RuntimeError("TARGET_VERIFY attention without verify metadata: call init_forward_metadata (or set "
                           "backend.verify_metadata = prepare_verify_metadata(backend, forward_batch)) first")
    return verify_attention(q, k, v, layer, metadata, save_kv_cache)


def register_hooks() -> None:
    """Register both hooks with SGLang's HookRegistry (applied by `load_plugins`); idempotent."""
    register(f"{BACKEND}.init_forward_metadata", _after_init_forward_metadata, "AFTER")
    register(f"{BACKEND}.forward_extend", _around_forward_extend, "AROUND")
