"""The packed mask-block objective: one clean sequence, many mask blocks at random anchors, one forward.

For a sequence x_0..x_{n-1} the clean tokens are the layout's candidate rows (prefix 0, causal) and each anchor k gets
a mask block after x_k, exactly as decoding builds them (`core.layout`, `core.masks`): row 0 sits at x_{k+1}'s slot
(the bonus), rows j = 1..B-1 must predict x_{k+1+j}, calibrated with embedding(x_{k+1}), the true bonus. The frozen
target's rows never see mask rows, so one forward trains every block at once. The loss is the cross-entropy of those
rows, optionally decayed with distance from the anchor (gamma ** (j-1)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.layout import build_layout


def random_anchors(length: int, count: int, generator: torch.Generator | None = None) -> list[int]:
    """`count` distinct anchors k with a bonus token after them (k <= length - 2), sorted."""
    count = min(count, length - 1)
    return sorted(torch.randperm(length - 1, generator=generator)[:count].tolist())


def mask_block_loss(engine, sequences: Tensor, anchors: list[list[int]], decay: float = 1.0) -> Tensor:
    """Mean (decay-weighted) cross-entropy of the draft rows of every block. `engine` is a ReferenceEngine over the
    frozen target with the adapter being trained; sequences [bs, n] token ids; anchors[i] for sequence i."""
    bs, n = sequences.shape
    B = engine.block_size
    layout = build_layout([0] * bs, [n] * bs, anchors, B)
    hidden = engine.forward(layout, sequences.reshape(-1), engine.new_cache(bs, n))

    blocks = torch.arange(len(layout.block_request))
    rows = layout.block_rows(blocks)[:, 1:]  # [blocks, B-1]: the draft rows
    owner, anchor = layout.block_request, layout.block_anchor
    bonus = sequences[owner, anchor + 1]
    target_pos = anchor[:, None] + 1 + torch.arange(1, B)
    valid = target_pos < n
    targets = sequences[owner[:, None], target_pos.clamp(max=n - 1)]
    logits = engine.draft_logits(hidden[rows], bonus).float()
    weights = valid * decay ** torch.arange(B - 1, dtype=torch.float32)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (loss * weights.reshape(-1)).sum() / weights.sum().clamp(min=1e-9)
