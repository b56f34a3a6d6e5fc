"""Attention visibility for a step layout: one rule, five encodings.

The rule (FLEXDRAFT.md, "Attention visibility"), for rows of the same request:
  - the cached prefix is visible to every row;
  - a candidate row sees candidates up to itself (causal) and never a mask row;
  - a mask row anchored after candidate k sees candidates 0..k and every row of its own block, nothing else.
Candidate rows therefore never depend on mask rows: their logits are the target's own.

Encodings (all True = may attend):
  dense_mask         [bs, Wmax, Pmax + Wmax]: keys are the cache prefix padded to Pmax, then this step's rows padded
                     to Wmax (the reference engine's and the trainer's form);
  full_mask          SGLang FULL_MASK: per request a W x (prefix + W) row-major block, concatenated over requests;
  flashinfer_mask    the same bits packed little-endian per request, with the byte indptr FlashInfer's custom-mask
                     prefill takes (what `flashinfer.segment_packbits(..., bitorder="little")` produces);
  ragged_mask        per request only the W x W block among this step's rows, row-major, concatenated (the prefix is
                     visible to every row, so it stays out of the mask and is attended unmasked from the paged cache);
  ragged_packed_mask the same bits packed little-endian per request: `packed_custom_mask` of a ragged prefill.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import StepLayout


def padded_rows(layout: StepLayout) -> tuple[Tensor, Tensor]:
    """[bs, Wmax] flat row index of each request's rows (0 where padded) and the validity mask."""
    counts = layout.rows_per_request
    wmax = int(counts.max()) if layout.batch_size else 0
    local = torch.arange(wmax, device=counts.device)
    valid = local[None, :] < counts[:, None]
    index = torch.where(valid, layout.request_row_start[:-1, None] + local[None, :], 0)
    return index, valid


def step_visibility(layout: StepLayout) -> Tensor:
    """[bs, Wmax, Wmax] visibility among each request's own rows this step (padded rows see nothing)."""
    index, valid = padded_rows(layout)
    anchor, block = layout.row_anchor[index], layout.row_block[index]
    q_anchor, q_block = anchor[:, :, None], block[:, :, None]
    k_anchor, k_block = anchor[:, None, :], block[:, None, :]
    sees_candidate = (k_block < 0) & (k_anchor <= q_anchor)
    sees_own_block = (k_block >= 0) & (k_block == q_block)
    return (sees_candidate | sees_own_block) & valid[:, :, None] & valid[:, None, :]


def dense_mask(layout: StepLayout) -> Tensor:
    """[bs, Wmax, Pmax + Wmax]. A padded query row is given its own diagonal so softmax stays finite; its output is
    meaningless and dropped by the caller."""
    index, valid = padded_rows(layout)
    pmax = int(layout.prefix_lens.max()) if layout.batch_size else 0
    prefix = torch.arange(pmax, device=index.device)[None, :] < layout.prefix_lens[:, None]
    prefix = prefix[:, None, :] & valid[:, :, None]
    own = step_visibility(layout) | torch.diag_embed(~valid)
    return torch.cat([prefix, own], dim=2)


def _kept_columns(layout: StepLayout) -> tuple[Tensor, Tensor]:
    """Row and column masks that cut each request's W x (P + W) block out of the dense form."""
    index, valid = padded_rows(layout)
    pmax = int(layout.prefix_lens.max()) if layout.batch_size else 0
    wmax = valid.shape[1]
    col = torch.arange(pmax + wmax, device=index.device)[None, :]
    keep_col = (col < layout.prefix_lens[:, None]) | ((col >= pmax) & (col - pmax < layout.rows_per_request[:, None]))
    return valid, keep_col


def full_mask(layout: StepLayout) -> Tensor:
    """SGLang FULL_MASK: flat bool, per request W x (prefix + W) row-major, concatenated over requests."""
    valid, keep_col = _kept_columns(layout)
    keep = valid[:, :, None] & keep_col[:, None, :]
    return dense_mask(layout)[keep]


def full_mask_indptr(layout: StepLayout) -> Tensor:
    """[bs+1] element offsets of each request's block in `full_mask`."""
    w = layout.rows_per_request
    sizes = w * (layout.prefix_lens + w)
    out = torch.zeros(layout.batch_size + 1, dtype=torch.long, device=w.device)
    out[1:] = torch.cumsum(sizes, 0)
    return out


def packbits_little(bits: Tensor) -> Tensor:
    """numpy.packbits(bits, bitorder="little") for a 1-D bool tensor."""
    pad = (-len(bits)) % 8
    padded = torch.cat([bits.to(torch.uint8), bits.new_zeros(pad, dtype=torch.uint8)]).view(-1, 8)
    weights = (2 ** torch.arange(8, device=bits.device)).to(torch.uint8)
    return (padded * weights).sum(1, dtype=torch.uint8)


def flashinfer_mask(layout: StepLayout) -> tuple[Tensor, Tensor]:
    """(packed uint8 mask, int32 byte indptr [bs+1]): each request's FULL_MASK block packed on its own."""
    flat, indptr = full_mask(layout), full_mask_indptr(layout)
    segments = [packbits_little(flat[indptr[i] : indptr[i + 1]]) for i in range(layout.batch_size)]
    byte_sizes = torch.tensor([len(s) for s in segments], dtype=torch.long)
    byte_indptr = torch.zeros(layout.batch_size + 1, dtype=torch.int32)
    byte_indptr[1:] = torch.cumsum(byte_sizes, 0)
    packed = torch.cat(segments) if segments else torch.zeros(0, dtype=torch.uint8)
    return packed, byte_indptr.to(flat.device)


def unpack_flashinfer_mask(packed: Tensor, byte_indptr: Tensor, element_indptr: Tensor) -> Tensor:
    """Inverse of `flashinfer_mask` back to the flat FULL_MASK form (used to check the encodings agree)."""
    bits = ((packed[:, None] >> torch.arange(8, device=packed.device)) & 1).bool().flatten()
    parts = []
    for i in range(len(byte_indptr) - 1):
        n = int(element_indptr[i + 1] - element_indptr[i])
        parts.append(bits[int(byte_indptr[i]) * 8 : int(byte_indptr[i]) * 8 + n])
    return torch.cat(parts) if parts else bits[:0]


def ragged_mask(layout: StepLayout) -> tuple[Tensor, Tensor]:
    """(flat bool, element indptr [bs+1]): each request's W x W `step_visibility` block, row-major, concatenated."""
    _, valid = padded_rows(layout)
    flat = step_visibility(layout)[valid[:, :, None] & valid[:, None, :]]
    w = layout.rows_per_request
    indptr = torch.zeros(layout.batch_size + 1, dtype=torch.long, device=w.device)
    indptr[1:] = torch.cumsum(w * w, 0)
    return flat, indptr


def ragged_packed_mask(layout: StepLayout) -> tuple[Tensor, Tensor]:
    """(packed uint8 mask, int32 byte indptr [bs+1]): each request's `ragged_mask` block packed on its own."""
    return packbits_segments(*ragged_mask(layout))


def packbits_segments(bits: Tensor, indptr: Tensor) -> tuple[Tensor, Tensor]:
    """(packed uint8, int32 byte indptr): each segment bits[indptr[i]:indptr[i+1]] packed little-endian on its own,
    as `flashinfer.segment_packbits(bits, indptr, bitorder="little")`."""
    segments = [packbits_little(bits[int(indptr[i]) : int(indptr[i + 1])]) for i in range(len(indptr) - 1)]
    byte_indptr = torch.zeros(len(indptr), dtype=torch.int32, device=bits.device)
    byte_indptr[1:] = torch.cumsum(torch.tensor([len(s) for s in segments], device=bits.device), 0)
    packed = torch.cat(segments) if segments else bits.new_zeros(0, dtype=torch.uint8)
    return packed, byte_indptr
