"""Attention of one step's rows as two parts merged by log-sum-exp, so the custom mask never spans the cached prefix.

Every row of a request sees all of its cached prefix (FLEXDRAFT.md, "Attention visibility in one forward"), so:
  (a) prefix part: the rows attend the request's prefix in the paged KV pool with no mask;
  (b) ragged part: the rows attend this step's own rows under the W x W mask of `core.masks.ragged_mask`
      (or see each other freely when the mask is None);
and the two are merged by their log-sum-exps, as SGLang's flashinfer backend merges its ragged and paged parts.

Shapes follow SGLang: q [rows, Hq, D]; k, v [rows, Hkv, D] (Hq a multiple of Hkv, q head h reads kv head h // (Hq/Hkv));
qo_indptr [bs+1] (rows of request i are qo_indptr[i]:qo_indptr[i+1]); k_buffer, v_buffer [slots, Hkv, D] (one layer of
MHATokenToKVPool, page size 1); kv_indptr [bs+1] and kv_indices (the prefix slots of each request, in order).

`attention_torch` is the computation in PyTorch (any device); `attention_blocks_sdpa` its unmasked case (mask blocks)
in one SDPA call, faster on CPU; `FlashInferMaskAttention` the same with FlashInfer kernels; `attend` picks FlashInfer
for CUDA tensors when it imports and `attention_blocks_sdpa` on CPU when there is no mask; `attention_reference_dense`
is SDPA over `core.masks.dense_mask`, what the reference engine computes, for comparisons.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.masks import packbits_segments


def _segments(indptr: Tensor) -> tuple[Tensor, Tensor]:
    """[bs, Lmax] flat index of each segment's entries (0 where padded) and the validity mask."""
    indptr = indptr.long()
    lens = indptr.diff()
    lmax = int(lens.max()) if len(lens) else 0
    local = torch.arange(lmax, device=indptr.device)
    valid = local[None, :] < lens[:, None]
    return torch.where(valid, indptr[:-1, None] + local[None, :], 0), valid


def _ragged_visibility(mask: Tensor | None, qo_indptr: Tensor, valid: Tensor) -> Tensor:
    """[bs, W, W] visibility among each request's rows from the flat ragged mask (all rows when None)."""
    both = valid[:, :, None] & valid[:, None, :]
    if mask is None:
        return both
    w = qo_indptr.long().diff().to(valid.device)
    start = torch.cumsum(w * w, 0) - w * w
    local = torch.arange(valid.shape[1], device=valid.device)
    index = start[:, None, None] + local[None, :, None] * w[:, None, None] + local[None, None, :]
    mask = mask.to(valid.device)
    return both & mask[torch.where(both, index, 0)]


# Most float32 scores one matmul materializes (128 MiB): a long prefill is processed in query chunks below this.
SCORE_BUDGET = 1 << 25


def _attend(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Masked attention returning (out, natural-log LSE); a row that sees nothing gets out 0, LSE -inf.
    q [..., R, D], k/v [..., K, D], visible broadcastable to [..., R, K]."""
    per_row = math.prod(q.shape[:-2]) * k.shape[-2]  # scores per query row across the batch dims
    step = max(1, SCORE_BUDGET // max(per_row, 1))
    outs, lses = [], []
    for s in range(0, q.shape[-2], step):
        vis = visible if visible.shape[-2] == 1 else visible[..., s : s + step, :]
        scores = torch.matmul(q[..., s : s + step, :], k.transpose(-1, -2)).mul_(scale)
        scores.masked_fill_(~vis, float("-inf"))
        lse = torch.logsumexp(scores, -1)
        probs = torch.exp(scores - lse.masked_fill(lse == float("-inf"), 0)[..., None])
        outs.append(torch.matmul(probs, v))
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, -2), torch.cat(lses, -1)


def merge_attention_states(o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over keys A and B from attention over each: o [..., D], lse [...] -> (o, lse).

    LSEs are natural-log (torch.logsumexp's base); FlashInfer's `return_lse` and `merge_state` use base 2, so multiply
    theirs by ln 2 before passing them here. A part with LSE -inf saw no key and drops out; two such parts give 0, -inf.
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    top = torch.maximum(lse_a, lse_b)
    top = top.masked_fill(top == float("-inf"), 0)  # both empty: keep exp() finite
    w_a, w_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = w_a + w_b
    denom = total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    out = o_a.float() * (w_a[..., None] / denom) + o_b.float() * (w_b[..., None] / denom)
    return out.to(o_a.dtype), torch.log(total) + top


def attention_torch(
    q: Tensor, k: Tensor, v: Tensor, qo_indptr: Tensor, k_buffer: Tensor, v_buffer: Tensor, kv_indptr: Tensor,
    kv_indices: Tensor, mask: Tensor | None = None, sm_scale: float | None = None,
) -> Tensor:
    """Prefix part + ragged part + LSE merge in PyTorch, batched over requests padded to the longest; float32 inside,
    returned in q's dtype. `mask` is the flat bool of `core.masks.ragged_mask` (None: a request's rows all see each
    other)."""
    hq, d = q.shape[1], q.shape[2]
    hkv = k.shape[1]
    g = hq // hkv
    scale = d**-0.5 if sm_scale is None else sm_scale
    rows, valid = _segments(qo_indptr.to(q.device))
    bs, w = rows.shape
    # [bs, Hkv, G*W, D]: the G query heads of one kv head share its keys
    qp = q[rows].float().view(bs, w, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(bs, hkv, g * w, d)
    vis = _ragged_visibility(mask, qo_indptr, valid)
    vis = vis[:, None].expand(bs, g, w, w).reshape(bs, 1, g * w, w)
    out, lse = _attend(qp, k[rows].float().transpose(1, 2), v[rows].float().transpose(1, 2), vis, scale)
    if int(kv_indptr[-1]) > 0:
        slot_index, prefix_ok = _segments(kv_indptr.to(q.device))
        slots = kv_indices.to(q.device).long()[slot_index]
        kp, vp = k_buffer[slots].float().transpose(1, 2), v_buffer[slots].float().transpose(1, 2)
        out_p, lse_p = _attend(qp, kp, vp, prefix_ok[:, None, None, :], scale)
        out, lse = merge_attention_states(out_p, lse_p, out, lse)
    out = out.view(bs, hkv, g, w, d).permute(0, 3, 1, 2, 4).reshape(bs, w, hq, d)
    return out[valid].to(q.dtype)


def attention_blocks_sdpa(
    q: Tensor, k: Tensor, v: Tensor, qo_indptr: Tensor, k_buffer: Tensor, v_buffer: Tensor, kv_indptr: Tensor,
    kv_indices: Tensor, sm_scale: float | None = None,
) -> Tensor:
    """`attention_torch` without a mask (every row sees its whole prefix and all its request's rows: a mask block) as
    one SDPA call over [prefix, rows], requests padded to the longest prefix; every request has the same row count.
    What `attend` runs off the GPU: the drafter's mask blocks, 1/4 of attention_torch's time at batch 1 on CPU."""
    w = q.shape[0] // (len(qo_indptr) - 1)
    if not bool((qo_indptr.long().diff() == w).all()):
        raise ValueError("attention_blocks_sdpa needs the same number of rows for every request")
    bs, hq, d = len(qo_indptr) - 1, q.shape[1], q.shape[2]
    slot_index, prefix_ok = _segments(kv_indptr.to(q.device))
    slots = kv_indices.to(q.device).long()[slot_index]

    def keys(buffer: Tensor, rows: Tensor) -> Tensor:  # [bs, Hkv, P + W, D] in float32
        return torch.cat([buffer[slots], rows.view(bs, w, *rows.shape[1:])], 1).float().transpose(1, 2)

    visible = None
    if not bool(prefix_ok.all()):
        visible = torch.cat([prefix_ok, prefix_ok.new_ones(bs, w)], 1)[:, None, None, :]
    out = F.scaled_dot_product_attention(q.view(bs, w, hq, d).float().transpose(1, 2), keys(k_buffer, k),
                                         keys(v_buffer, v), attn_mask=visible, scale=sm_scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(bs * w, hq, d).to(q.dtype)


def attention_reference_dense(
    q: Tensor, k: Tensor, v: Tensor, qo_indptr: Tensor, k_buffer: Tensor, v_buffer: Tensor, kv_indptr: Tensor,
    kv_indices: Tensor, dense: Tensor, sm_scale: float | None = None,
) -> Tensor:
    """The same attention as one SDPA under `dense` = `core.masks.dense_mask(layout)` [bs, Wmax, Pmax + Wmax] (keys:
    the prefix gathered from the pool padded to Pmax, then the step's rows padded to Wmax); float32 inside."""
    g = q.shape[1] // k.shape[1]
    rows, valid = _segments(qo_indptr.to(q.device))
    slot_index, _ = _segments(kv_indptr.to(q.device))
    if dense.shape[1:] != (rows.shape[1], slot_index.shape[1] + rows.shape[1]):
        raise ValueError("dense mask does not match qo_indptr / kv_indptr")
    slots = kv_indices.to(q.device).long()[slot_index]

    def heads(x: Tensor) -> Tensor:  # [bs, L, H, D] -> [bs, Hq, L, D] in float32
        return x.float().transpose(1, 2).repeat_interleave(g, dim=1)

    keys = heads(torch.cat([k_buffer[slots], k[rows]], 1))
    values = heads(torch.cat([v_buffer[slots], v[rows]], 1))
    out = F.scaled_dot_product_attention(
        q[rows].float().transpose(1, 2), keys, values, attn_mask=dense[:, None].to(q.device), scale=sm_scale
    )
    return out.transpose(1, 2)[valid].to(q.dtype)


# FlashInfer's float workspace as SGLang 0.5.23 sizes it (SGLANG_FLASHINFER_WORKSPACE_SIZE, srt/environ.py: 384 MiB;
# flashinfer_backend.py raises it to 512 MiB for Qwen2/Qwen3): split-KV over long prefixes with few KV heads needs more
# than FlashInfer's 128 MiB example. Inside SGLang the drafter passes SGLang's own buffer instead (sglang/drafter.py).
WORKSPACE_BYTES = 384 << 20


class FlashInferMaskAttention:
    """The two parts with FlashInfer: `plan` once per step (all layers share it), `run` per layer.

    Calls follow SGLang 0.5.23 python/sglang/srt/layers/attention/flashinfer_backend.py (the extend path's
    `forward_return_lse` on a ragged and a paged wrapper merged by `merge_state`, paged plan with page size 1 and
    kv_last_page_len of ones, k_buffer/v_buffer passed as a tuple), with signatures checked against
    flashinfer-ai/flashinfer fb28d7242b35 (flashinfer/prefill.py, flashinfer/cascade.py, flashinfer/utils.py
    `_expand_4d`, include/flashinfer/attention/variants.cuh and cascade.cuh). Inputs are fp16/bf16 (FlashInfer's
    prefill kernels); indptr/indices go in as int32.
    """

    def __init__(self, device: torch.device | str = "cuda", workspace: Tensor | None = None) -> None:
        import flashinfer
        from flashinfer.cascade import merge_state

        self._flashinfer, self._merge_state = flashinfer, merge_state
        if workspace is None:
            workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._workspace = workspace  # split-KV scratch, shared by both wrappers (as SGLang shares one among its own)
        # fa2 explicitly: "auto" is resolved once at the first plan and may pick fa3, which has no custom mask
        self._paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD", backend="fa2")
        # One ragged wrapper per mask mode: plan() without a mask leaves an earlier plan's mask buffer in place, and
        # the kernel runs masked whenever that buffer is set.
        self._ragged_by_mode: dict[bool, object] = {}
        self._ragged = None
        self._has_prefix = False

    def _ragged_wrapper(self, masked: bool):
        if masked not in self._ragged_by_mode:
            self._ragged_by_mode[masked] = self._flashinfer.BatchPrefillWithRaggedKVCacheWrapper(
                self._workspace, "NHD", backend="fa2"
            )
        return self._ragged_by_mode[masked]

    def plan(
        self, qo_indptr: Tensor, kv_indptr: Tensor, kv_indices: Tensor, num_qo_heads: int, num_kv_heads: int,
        head_dim: int, packed_mask: tuple[Tensor, Tensor] | None = None, sm_scale: float | None = None,
        q_dtype: torch.dtype = torch.bfloat16, kv_dtype: torch.dtype | None = None,
    ) -> None:
        """`packed_mask` is `core.masks.ragged_packed_mask(layout)` (packed bits, byte indptr) or None (rows of a
        request all see each other); `q_dtype` is q's (and this step's k/v's) dtype, `kv_dtype` the pool's."""
        dev = self._workspace.device
        qo = qo_indptr.to(dev, torch.int32)
        self._has_prefix = int(kv_indptr[-1]) > 0
        if self._has_prefix:  # an all-empty prefix skips the paged part, as SGLang does for extend_no_prefix
            kv = kv_indptr.to(dev, torch.int32)
            last_page_len = torch.ones(len(qo) - 1, dtype=torch.int32, device=dev)  # page size 1: kv_len = indptr diff
            self._paged.plan(
                qo, kv, kv_indices.to(dev, torch.int32), last_page_len, num_qo_heads, num_kv_heads, head_dim, 1,
                causal=False, sm_scale=sm_scale, q_data_type=q_dtype, kv_data_type=kv_dtype,
            )
        self._ragged = self._ragged_wrapper(packed_mask is not None)
        self._ragged.plan(
            qo, qo, num_qo_heads, num_kv_heads, head_dim,
            packed_custom_mask=None if packed_mask is None else packed_mask[0].to(dev),
            causal=False, sm_scale=sm_scale, q_data_type=q_dtype,  # this step's k/v come in q's dtype
        )
        if packed_mask is not None:
            # Given only packed_custom_mask, plan() stores element offsets (qo_len * kv_len sums) as the mask indptr,
            # but the kernel adds it to a uint8 pointer (variants.cuh): it needs byte offsets (flashinfer PR #2201).
            if not hasattr(self._ragged, "_mask_indptr_buf"):
                raise RuntimeError("this FlashInfer has no _mask_indptr_buf; recheck the packed-mask indptr fix")
            self._ragged._mask_indptr_buf = packed_mask[1].to(dev, torch.int32)

    def run(self, q: Tensor, k: Tensor, v: Tensor, k_buffer: Tensor, v_buffer: Tensor) -> Tensor:
        out, lse = self._ragged.run(q, k, v, return_lse=True)
        if not self._has_prefix:
            return out
        out_p, lse_p = self._paged.run(q, (k_buffer, v_buffer), return_lse=True)  # 3-D buffers = page size 1
        return self._merge(out_p, lse_p, out, lse)

    def _merge(self, o_a: Tensor, lse_a: Tensor, o_b: Tensor, lse_b: Tensor) -> Tensor:
        # merge_state launches head_dim / vec_size x num_heads threads per block (cascade.cuh); past CUDA's 1024 use
        # the torch merge, whose LSEs are natural-log while FlashInfer's are base 2.
        vec_size = max(16 // o_a.element_size(), o_a.shape[2] // 32)
        if o_a.shape[2] // vec_size * o_a.shape[1] <= 1024:
            return self._merge_state(o_a, lse_a, o_b, lse_b)[0]
        return merge_attention_states(o_a, lse_a * math.log(2), o_b, lse_b * math.log(2))[0]


@lru_cache(maxsize=1)
def flashinfer_available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


@lru_cache(maxsize=None)
def _default_flashinfer(device: torch.device) -> FlashInferMaskAttention:
    return FlashInferMaskAttention(device)


def attend(
    q: Tensor, k: Tensor, v: Tensor, qo_indptr: Tensor, k_buffer: Tensor, v_buffer: Tensor, kv_indptr: Tensor,
    kv_indices: Tensor, mask: Tensor | None = None, sm_scale: float | None = None,
    planned: FlashInferMaskAttention | None = None,
) -> Tensor:
    """One layer's attention: FlashInfer for CUDA tensors when it imports, `attention_torch` otherwise.

    `planned` is a FlashInferMaskAttention already planned for this step (the per-step path; the indptrs, mask and
    scale it was planned with are the ones used); without it the step is planned here on a cached per-device instance.
    FlashInfer errors propagate: a GPU run never falls back silently.
    """
    if not (q.is_cuda and flashinfer_available()):
        if mask is None and not q.is_cuda:
            return attention_blocks_sdpa(q, k, v, qo_indptr, k_buffer, v_buffer, kv_indptr, kv_indices, sm_scale)
        return attention_torch(q, k, v, qo_indptr, k_buffer, v_buffer, kv_indptr, kv_indices, mask, sm_scale)
    if planned is None:
        planned = _default_flashinfer(q.device)
        packed = None
        if mask is not None:
            w = qo_indptr.long().diff()
            packed = packbits_segments(mask, torch.cat([w.new_zeros(1), torch.cumsum(w * w, 0)]))
        planned.plan(
            qo_indptr, kv_indptr, kv_indices, q.shape[1], k.shape[1], q.shape[2], packed, sm_scale,
            q_dtype=q.dtype, kv_dtype=k_buffer.dtype,
        )
    return planned.run(q, k, v, k_buffer, v_buffer)
