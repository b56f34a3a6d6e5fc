"""Bonus-guided calibration fused with what the next draft step reads from its logits.

The calibrated draft logits are `logits[..., :V] + calibration(bonus_embedding, hidden)`, and every draft step then
needs each row's argmax, its top probability at temperature 1 (the verify-length rule) and, when sampling,
softmax(logits / temperature). In PyTorch that is a [M, V] correction, an add, and two or three softmax passes over
[M, V]; the kernels below produce all of it in one pass over the vocabulary (plus one more to write probabilities):

  1. `_up_kernel`      u = silu(unit_rms(e) @ Wa^T + unit_rms(h) @ Wb^T + b_up)               [M, r] float32
  2. `_down_kernel`    x = logits + u @ Wd^T + b_down, per (row tile, vocab tile): stores x and each row's partial
                       max, argmax, sum exp(x - max) and, with temperatures, sum exp((x - max) / t)
  3. `_reduce_kernel`  per row: combines the partials into the token, the top probability and the softmax statistics
  4. `_probs_kernel`   (with temperatures) probs = exp((x - max) / t) / sum

`calibrate` runs the kernels on CUDA tensors and `calibrate_reference`, the spec, everywhere else;
`calibrated_drafts` is what the engines call, for either form of calibration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..adapter.modules import CalibrationMLP
from ..core.sampling import CalibratedDrafts

RMS_EPS = 1e-6  # as flexdraft_sgl.adapter.modules._unit_rms


def calibrated_drafts(calibration: CalibrationMLP, bonus_embedding: Tensor, hidden: Tensor, head,
                      temperatures: Tensor | None = None) -> CalibratedDrafts:
    """What a draft step reads, from final-normed draft `hidden` and `head` (hidden -> logits, the target's LM head).
    A logits-form calibration goes through `calibrate` (the fused kernels on a GPU); a hidden-form one adds its small
    correction before the head, which leaves only the softmax statistics to compute: over the head's draft vocabulary
    alone when it has one (`DraftHead`) and no row samples."""
    token_ids = getattr(head, "token_ids", None)
    if calibration.form == "hidden" and token_ids is not None and temperatures is None:
        compact = head.compact(calibration.corrected(bonus_embedding, hidden)).float()
        drafts = drafts_from_logits(compact)
        return CalibratedDrafts(None, token_ids[drafts.tokens], drafts.top, None)
    if calibration.form == "hidden":
        return drafts_from_logits(calibration.logits(bonus_embedding, hidden, head).float(), temperatures)
    return calibrate(calibration, bonus_embedding, hidden, head(hidden), temperatures)


def calibrate(calibration: CalibrationMLP, bonus_embedding: Tensor, hidden: Tensor, logits: Tensor,
              temperatures: Tensor | None = None) -> CalibratedDrafts:
    """The Triton kernels where the tensors are on a GPU, the reference elsewhere (logits-form calibration)."""
    fn = calibrate_triton if logits.is_cuda else calibrate_reference
    return fn(calibration, bonus_embedding, hidden, logits, temperatures)


def calibrate_reference(calibration: CalibrationMLP, bonus_embedding: Tensor, hidden: Tensor, logits: Tensor,
                        temperatures: Tensor | None = None) -> CalibratedDrafts:
    """The spec. bonus_embedding, hidden [..., H]; logits [..., V'] with V' >= V (a padded vocabulary keeps its first V
    columns); temperatures [...] (> 0), or None when no row samples. The MLP runs in its own dtype, as the drafter's
    module call does; everything from the add on is float32."""
    vocab = calibration.vocab_size
    return drafts_from_logits(logits[..., :vocab].float() + calibration(bonus_embedding, hidden).float(), temperatures)


def drafts_from_logits(x: Tensor, temperatures: Tensor | None = None) -> CalibratedDrafts:
    """Argmax, top probability at temperature 1 and (with temperatures) softmax(x / t) of float32 draft logits."""
    probs = None
    if temperatures is not None:
        probs = torch.softmax(x / temperatures.expand(x.shape[:-1]).float()[..., None], -1)
    return CalibratedDrafts(x, x.argmax(-1), torch.softmax(x, -1).amax(-1), probs)


def calibrate_triton(calibration: CalibrationMLP, bonus_embedding: Tensor, hidden: Tensor, logits: Tensor,
                     temperatures: Tensor | None = None) -> CalibratedDrafts:
    """`calibrate_reference` in Triton kernels; products accumulate in float32 whatever the input dtype."""
    if calibration.form != "logits":
        raise ValueError("the fused calibration kernels take a logits-form calibration (see `calibrated_drafts`)")
    lead, H = hidden.shape[:-1], hidden.shape[-1]
    up_w, up_b = calibration.up.weight.contiguous(), calibration.up.bias.contiguous()        # [r, 2H], [r]
    down_w, down_b = calibration.down.weight.contiguous(), calibration.down.bias.contiguous()  # [V, r], [V]
    rank, vocab = up_w.shape[0], calibration.vocab_size
    e, h = _rows(bonus_embedding.expand_as(hidden)), _rows(hidden)
    x_in = _rows(logits)
    M, device = h.shape[0], h.device
    # float32 weights (tests, the CPU reference's precision) keep float32 accuracy through 3 TF32 products; 16-bit
    # weights use their own tensor-core dot, where the precision argument does not apply.
    precision = "tf32x3" if up_w.dtype == torch.float32 else "tf32"

    block_m = min(64, max(16, triton.next_power_of_2(M)))
    u = torch.empty(M, rank, device=device, dtype=torch.float32)
    block_r_up = 16 if M <= 64 else 32  # few rows: narrower rank tiles, so more programs share the weight reads
    _up_kernel[(triton.cdiv(M, block_m), triton.cdiv(rank, block_r_up))](
        e, h, up_w, up_b, u, M, H, rank, e.stride(0), h.stride(0), up_w.stride(0), RMS_EPS,
        UNIT_RMS=calibration.input_scaling == "unit-rms", BLOCK_M=block_m, BLOCK_R=block_r_up,
        BLOCK_K=min(128, max(16, triton.next_power_of_2(H))),
        PRECISION=precision,
    )

    block_v = 128
    n_tiles = triton.cdiv(vocab, block_v)
    x = torch.empty(M, vocab, device=device, dtype=torch.float32)
    part_max = torch.empty(M, n_tiles, device=device, dtype=torch.float32)
    part_arg = torch.empty(M, n_tiles, device=device, dtype=torch.int32)
    part_sum = torch.empty(M, n_tiles, device=device, dtype=torch.float32)
    has_t = temperatures is not None
    # Without temperatures the temperature-only arguments are never touched; any float32 buffer stands in.
    t = temperatures.expand(lead).reshape(-1).float().contiguous() if has_t else part_sum
    part_sum_t = torch.empty_like(part_sum) if has_t else part_sum
    # Row tiles vary fastest, so the programs running together share one vocabulary tile of the down weight in L2;
    # at small M the vocabulary tiles alone (V / 128, ~1200 for 152k) fill the GPU.
    grid = (triton.cdiv(M, block_m), n_tiles)
    _down_kernel[grid](
        x_in, u, down_w, down_b, t, x, part_max, part_arg, part_sum, part_sum_t,
        M, vocab, rank, x_in.stride(0), down_w.stride(0), n_tiles,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_R=min(64, max(16, triton.next_power_of_2(rank))),
        HAS_T=has_t, PRECISION=precision,
    )

    tokens = torch.empty(M, device=device, dtype=torch.int64)
    top = torch.empty(M, device=device, dtype=torch.float32)
    row_max = torch.empty(M, device=device, dtype=torch.float32) if has_t else top
    row_sum_t = torch.empty(M, device=device, dtype=torch.float32) if has_t else top
    _reduce_kernel[(M,)](
        part_max, part_arg, part_sum, part_sum_t, t, tokens, top, row_max, row_sum_t, n_tiles,
        BLOCK_N=triton.next_power_of_2(n_tiles), HAS_T=has_t,
    )

    probs = None
    if has_t:
        probs = torch.empty_like(x)
        _probs_kernel[grid](x, row_max, row_sum_t, t, probs, M, vocab, BLOCK_M=block_m, BLOCK_V=block_v)
        probs = probs.view(*lead, vocab)
    return CalibratedDrafts(x.view(*lead, vocab), tokens.view(lead), top.view(lead), probs)


def _rows(x: Tensor) -> Tensor:
    """[..., D] as [M, D] rows with unit stride along D (the kernels take a row stride)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def _up_kernel(e_ptr, h_ptr, w_ptr, b_ptr, u_ptr, M, H, R, stride_e, stride_h, stride_w, eps,
               UNIT_RMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr):
    """u = silu(unit_rms(e) @ W[:, :H]^T + unit_rms(h) @ W[:, H:]^T + b) (without UNIT_RMS: raw e and h). The RMS
    scale is per row, so it factors out of the dot: the loop accumulates e @ Wa^T and sum(e^2) side by side and
    scales once at the end."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok, col_ok = rows < M, cols < R
    acc_e = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    acc_h = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    sq_e = tl.zeros([BLOCK_M], dtype=tl.float32)
    sq_h = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        in_mask = row_ok[:, None] & k_ok[None, :]
        w_mask = col_ok[:, None] & k_ok[None, :]
        e = tl.load(e_ptr + rows[:, None] * stride_e + ks[None, :], mask=in_mask, other=0.0)
        h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=in_mask, other=0.0)
        wa = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=w_mask, other=0.0)
        wb = tl.load(w_ptr + cols[:, None] * stride_w + H + ks[None, :], mask=w_mask, other=0.0)
        acc_e = tl.dot(e.to(wa.dtype), tl.trans(wa), acc_e, input_precision=PRECISION)
        acc_h = tl.dot(h.to(wb.dtype), tl.trans(wb), acc_h, input_precision=PRECISION)
        e32, h32 = e.to(tl.float32), h.to(tl.float32)
        sq_e += tl.sum(e32 * e32, axis=1)
        sq_h += tl.sum(h32 * h32, axis=1)
    if UNIT_RMS:
        scale_e = tl.rsqrt(sq_e / H + eps)
        scale_h = tl.rsqrt(sq_h / H + eps)
    else:
        scale_e = tl.full([BLOCK_M], 1.0, tl.float32)
        scale_h = tl.full([BLOCK_M], 1.0, tl.float32)
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    u = acc_e * scale_e[:, None] + acc_h * scale_h[:, None] + bias[None, :]
    u = u * tl.sigmoid(u)
    tl.store(u_ptr + rows[:, None] * R + cols[None, :], u, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(logits_ptr, u_ptr, w_ptr, b_ptr, t_ptr, x_ptr, max_ptr, arg_ptr, sum_ptr, sum_t_ptr,
                 M, V, R, stride_logits, stride_w, n_tiles,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr, HAS_T: tl.constexpr,
                 PRECISION: tl.constexpr):
    """One (row tile, vocabulary tile): x = logits + u @ Wd^T + bd, stored in float32, and the tile's softmax partials
    per row, so no later pass has to read x again except to write probabilities."""
    pid_v = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < M, cols < V
    rows64 = rows.to(tl.int64)  # M * V can pass 2^31 at large batches
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, R, BLOCK_R):
        ks = k0 + tl.arange(0, BLOCK_R)
        k_ok = ks < R
        u = tl.load(u_ptr + rows[:, None] * R + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(u.to(w.dtype), tl.trans(w), acc, input_precision=PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    base = tl.load(logits_ptr + rows64[:, None] * stride_logits + cols[None, :], mask=mask, other=0.0)
    bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0)
    x = acc + base.to(tl.float32) + bias.to(tl.float32)[None, :]
    tl.store(x_ptr + rows64[:, None] * V + cols[None, :], x, mask=mask)

    x = tl.where(col_ok[None, :], x, float("-inf"))
    m = tl.max(x, axis=1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a tile of -inf logits adds 0, not NaN
    shifted = x - m_safe[:, None]
    part = rows * n_tiles + pid_v
    tl.store(max_ptr + part, m, mask=row_ok)
    tl.store(arg_ptr + part, pid_v * BLOCK_V + tl.argmax(x, axis=1), mask=row_ok)
    tl.store(sum_ptr + part, tl.sum(tl.exp(shifted), axis=1), mask=row_ok)
    if HAS_T:
        t = tl.load(t_ptr + rows, mask=row_ok, other=1.0)
        tl.store(sum_t_ptr + part, tl.sum(tl.exp(shifted / t[:, None]), axis=1), mask=row_ok)


@triton.jit
def _reduce_kernel(max_ptr, arg_ptr, sum_ptr, sum_t_ptr, t_ptr, tokens_ptr, top_ptr, row_max_ptr, row_sum_t_ptr,
                   n_tiles, BLOCK_N: tl.constexpr, HAS_T: tl.constexpr):
    """One row: rescale each tile's sum to the row's max and add up. The softmax maximum is exp(0) / sum, and the
    token is the first index reaching the row's max (tiles in vocabulary order, each tile's argmax its first)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_N)
    ok = offs < n_tiles
    part_max = tl.load(max_ptr + row * n_tiles + offs, mask=ok, other=float("-inf"))
    part_arg = tl.load(arg_ptr + row * n_tiles + offs, mask=ok, other=2147483647)
    m = tl.max(part_max, axis=0)
    tl.store(tokens_ptr + row, tl.min(tl.where(part_max == m, part_arg, 2147483647), axis=0).to(tl.int64))
    part_sum = tl.load(sum_ptr + row * n_tiles + offs, mask=ok, other=0.0)
    tl.store(top_ptr + row, 1.0 / tl.sum(part_sum * tl.exp(part_max - m), axis=0))
    if HAS_T:
        t = tl.load(t_ptr + row)
        part_sum_t = tl.load(sum_t_ptr + row * n_tiles + offs, mask=ok, other=0.0)
        tl.store(row_max_ptr + row, m)
        tl.store(row_sum_t_ptr + row, tl.sum(part_sum_t * tl.exp((part_max - m) / t), axis=0))


@triton.jit
def _probs_kernel(x_ptr, row_max_ptr, row_sum_t_ptr, t_ptr, probs_ptr, M, V,
                  BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr):
    """softmax(x / t) from the row statistics: exp((x - max) / t) / sum."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < V)[None, :]
    offsets = rows.to(tl.int64)[:, None] * V + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    m = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    s = tl.load(row_sum_t_ptr + rows, mask=row_ok, other=1.0)
    t = tl.load(t_ptr + rows, mask=row_ok, other=1.0)
    p = tl.exp((x - m[:, None]) / t[:, None]) / s[:, None]
    tl.store(probs_ptr + offsets, p, mask=mask)
