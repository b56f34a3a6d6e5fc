"""Pure-torch version of sgl_kernel's CPU KV-cache row copy (SGLang's Triton reference: `copy_all_layer_kv_cache_tiled`
in `sglang/kernels/ops/kvcache/cache_move.py`)."""

from __future__ import annotations

import ctypes

import torch


def _rows(address: int, num_rows: int, row_bytes: int) -> torch.Tensor:
    """The first num_rows rows of a KV buffer, as a [num_rows, row_bytes] uint8 view of its memory (no copy)."""
    memory = (ctypes.c_uint8 * (num_rows * row_bytes)).from_address(address)
    return torch.frombuffer(memory, dtype=torch.uint8).view(num_rows, row_bytes)


def copy_all_layer_kv_cache_cpu(data_ptrs, strides, tgt_loc, src_loc):
    """In every buffer (one per layer and K/V; given by data pointer and row stride in bytes) copy row src_loc[i] to
    row tgt_loc[i]. All sources are read before any target is written, as in the Triton kernel."""
    if tgt_loc.numel() == 0:
        return
    tgt, src = tgt_loc.long(), src_loc.long()
    num_rows = int(torch.maximum(tgt.max(), src.max())) + 1
    for address, row_bytes in zip(data_ptrs.tolist(), strides.tolist()):
        rows = _rows(address, num_rows, row_bytes)
        rows[tgt] = rows[src]
