"""Step layouts: which rows one target forward carries, where they sit, and which mask block each row belongs to.

Every FlexDraft forward has one shape. Per request there are `n` candidate rows (all layers, causal, K/V written to
the cache at positions prefix_len .. prefix_len+n-1) and zero or more mask blocks of `B` rows (final N layers only),
each anchored after one candidate: row j of a block anchored after candidate k sits at position prefix_len+k+1+j.
The step kinds differ only in `n` and the anchors:

    prefill             n = prompt tokens not yet cached    one block after the last prompt token
    parallel (v)        n = v+1: [c0, d1..dv]               a block after each candidate (g = v+1 blocks)
    sequential draft    n = 1:   [b]                        one block after b
    sequential verify   n = v+1: [t, d1..dv]                no blocks
    plain decode        n = 1                               no blocks
    training            n = sequence length (prefix 0)      blocks at random anchors

Rows are flattened request-major (SGLang's order); inside a request, candidates first, then blocks in the order given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepLayout:
    block_size: int
    prefix_lens: Tensor  # [bs] tokens of each request already in the KV cache
    num_candidates: Tensor  # [bs] candidate rows (n)
    block_request: Tensor  # [blocks] owning request, non-decreasing
    block_anchor: Tensor  # [blocks] candidate index (0..n-1) each block is anchored after
    # Derived, one entry per row in flat order:
    row_request: Tensor = field(init=False)
    row_position: Tensor = field(init=False)  # absolute token position (RoPE)
    row_anchor: Tensor = field(init=False)  # candidates: own index; mask rows: their block's anchor
    row_block: Tensor = field(init=False)  # global block id, -1 for candidate rows
    row_local: Tensor = field(init=False)  # index among the request's rows this step
    request_row_start: Tensor = field(init=False)  # [bs+1] offsets of each request's rows

    def __post_init__(self) -> None:
        dev = self.prefix_lens.device
        bs, B = len(self.prefix_lens), self.block_size
        n = self.num_candidates
        if (n < 1).any():
            raise ValueError("every request needs at least one candidate row")
        if len(self.block_request) and (self.block_request.diff() < 0).any():
            raise ValueError("blocks must be grouped by request, in request order")
        if len(self.block_anchor) and (
            (self.block_anchor < 0).any() or (self.block_anchor >= n[self.block_request]).any()
        ):
            raise ValueError("a block anchor must name one of its request's candidates")
        blocks_per_req = torch.bincount(self.block_request, minlength=bs)
        rows_per_req = n + blocks_per_req * B
        start = torch.zeros(bs + 1, dtype=torch.long, device=dev)
        start[1:] = torch.cumsum(rows_per_req, 0)

        # Candidate rows.
        c_req = torch.repeat_interleave(torch.arange(bs, device=dev), n)
        c_first = torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        c_idx = torch.arange(int(n.sum()), device=dev) - c_first
        # Mask rows: block k, row j.
        nb = len(self.block_request)
        first_block = torch.cumsum(blocks_per_req, 0) - blocks_per_req
        b_local = torch.arange(nb, device=dev) - first_block[self.block_request]
        m_block = torch.repeat_interleave(torch.arange(nb, device=dev), B)
        m_j = torch.arange(B, device=dev).repeat(nb)
        m_req = self.block_request[m_block]
        m_anchor = self.block_anchor[m_block]
        m_local = n[m_req] + b_local[m_block] * B + m_j

        total = int(start[-1])
        req = torch.empty(total, dtype=torch.long, device=dev)
        local = torch.empty_like(req)
        anchor = torch.empty_like(req)
        block = torch.full_like(req, -1)
        pos = torch.empty_like(req)
        c_flat = start[c_req] + c_idx
        m_flat = start[m_req] + m_local
        req[c_flat], local[c_flat], anchor[c_flat], pos[c_flat] = c_req, c_idx, c_idx, self.prefix_lens[c_req] + c_idx
        req[m_flat], local[m_flat], anchor[m_flat], block[m_flat] = m_req, m_local, m_anchor, m_block
        pos[m_flat] = self.prefix_lens[m_req] + m_anchor + 1 + m_j
        for name, value in dict(
            row_request=req, row_position=pos, row_anchor=anchor, row_block=block, row_local=local,
            request_row_start=start,
        ).items():
            object.__setattr__(self, name, value)

    # ---- sizes -------------------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return len(self.prefix_lens)

    @property
    def num_rows(self) -> int:
        return len(self.row_request)

    @property
    def rows_per_request(self) -> Tensor:
        return self.request_row_start.diff()

    @property
    def is_mask_row(self) -> Tensor:
        return self.row_block >= 0

    @property
    def candidate_rows(self) -> Tensor:
        """Flat indices of candidate rows, request-major (the order of `candidates_only()`'s rows)."""
        return torch.nonzero(self.row_block < 0).flatten()

    @property
    def mask_rows(self) -> Tensor:
        return torch.nonzero(self.row_block >= 0).flatten()

    @property
    def has_blocks(self) -> bool:
        return len(self.block_request) > 0

    # ---- derived layouts and lookups ---------------------------------------------------------------------------
    def candidates_only(self) -> StepLayout:
        """The same step without mask blocks: what the layers below the split see."""
        empty = self.block_request[:0]
        return StepLayout(self.block_size, self.prefix_lens, self.num_candidates, empty, empty)

    def block_rows(self, blocks: Tensor) -> Tensor:
        """[len(blocks), B] flat row indices of the given global block ids."""
        bs = self.batch_size
        per_req = torch.bincount(self.block_request, minlength=bs)
        first_block = torch.cumsum(per_req, 0) - per_req
        req = self.block_request[blocks]
        before = (blocks - first_block[req]) * self.block_size  # rows of the request's earlier blocks
        first_row = self.request_row_start[req] + self.num_candidates[req] + before
        return first_row[:, None] + torch.arange(self.block_size, device=blocks.device)

    def block_after(self, anchors: Tensor) -> Tensor:
        """[bs] global id of each request's block anchored after candidate `anchors[i]` (one must exist)."""
        match = (self.block_request[None, :] == torch.arange(self.batch_size, device=anchors.device)[:, None]) & (
            self.block_anchor[None, :] == anchors[:, None]
        )
        if not bool(match.any(1).all()):
            raise ValueError("no mask block is anchored after the requested candidate")
        return match.int().argmax(1)

    def last_candidate_rows(self) -> Tensor:
        """[bs] flat row index of each request's last candidate."""
        return self.request_row_start[:-1] + self.num_candidates - 1


def _long(x, device=None) -> Tensor:
    return torch.as_tensor(x, dtype=torch.long, device=device)


def build_layout(prefix_lens, num_candidates, anchors: list[list[int]], block_size: int) -> StepLayout:
    """General constructor: `anchors[i]` lists the candidate indices of request i that get a mask block."""
    prefix_lens = _long(prefix_lens)
    dev = prefix_lens.device
    block_request = _long([i for i, a in enumerate(anchors) for _ in a], dev)
    block_anchor = _long([k for a in anchors for k in a], dev)
    return StepLayout(block_size, prefix_lens, _long(num_candidates, dev), block_request, block_anchor)


def prefill_layout(prompt_lens, block_size: int, cached_lens=None, with_block: bool = True) -> StepLayout:
    """Prompt rows (minus an already-cached prefix) plus one block after the last prompt token."""
    prompt_lens = _long(prompt_lens)
    cached = torch.zeros_like(prompt_lens) if cached_lens is None else _long(cached_lens, prompt_lens.device)
    n = prompt_lens - cached
    anchors = [[int(k) - 1] if with_block else [] for k in n]
    return build_layout(cached, n, anchors, block_size)


def parallel_layout(prefix_lens, verify_lens, block_size: int) -> StepLayout:
    """Candidates [c0, d1..dv] plus a block after each of them: block k holds the drafts for "k accepted"."""
    v = _long(verify_lens)
    return build_layout(prefix_lens, v + 1, [list(range(int(x) + 1)) for x in v], block_size)


def draft_layout(prefix_lens, block_size: int) -> StepLayout:
    """Sequential mode, first forward: the bonus token plus one block after it."""
    bs = len(prefix_lens)
    return build_layout(prefix_lens, [1] * bs, [[0]] * bs, block_size)


def verify_layout(prefix_lens, verify_lens, block_size: int) -> StepLayout:
    """Sequential mode, second forward: [t, d1..dv], causal, no mask rows."""
    v = _long(verify_lens)
    return build_layout(prefix_lens, v + 1, [[] for _ in v], block_size)


def decode_layout(prefix_lens, block_size: int) -> StepLayout:
    """Plain autoregressive decoding: one row per request."""
    return verify_layout(prefix_lens, [0] * len(prefix_lens), block_size)
