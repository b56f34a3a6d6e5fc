"""The packed mask-block objective: one clean sequence, many mask blocks at random anchors, one forward.

For a sequence x_0..x_{n-1} the clean tokens are the layout's candidate rows (prefix 0, causal) and each anchor k gets
a mask block after x_k, exactly as decoding builds them (`core.layout`, `core.masks`): row 0 sits at x_{k+1}'s slot
(the bonus), rows j = 1..B-1 must predict x_{k+1+j}, calibrated with embedding(x_{k+1}), the true bonus. The frozen
target's rows never see mask rows, so one forward trains every block at once. The loss is the cross-entropy of those
rows, optionally decayed with distance from the anchor (gamma ** (j-1)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.layout import build_layout


def random_anchors(length: int, count: int, generator: torch.Generator | None = None, first: int = 0) -> list[int]:
    """`count` distinct anchors k in [first, length - 3] (a bonus and at least one draft target after each), sorted."""
    span = max(length - 2 - first, 0)
    return sorted((first + torch.randperm(span, generator=generator)[:min(count, span)]).tolist())


@dataclass
class PackedBlocks:
    """Every mask block of one packed forward: the draft rows' hidden states and what they should predict."""

    hidden: Tensor  # [blocks, B-1, H] last-layer hidden states (pre-norm) of draft rows 1..B-1
    bonus: Tensor  # [blocks] the true token at row 0's slot (calibration input)
    targets: Tensor  # [blocks, B-1] the tokens rows 1..B-1 should draft
    valid: Tensor  # [blocks, B-1] False where the target lies past the sequence's end
    owner: Tensor  # [blocks] sequence of each block
    anchor: Tensor  # [blocks] anchor position within its sequence


def packed_blocks(engine, sequences, anchors: list[list[int]], split_hidden: list[Tensor] | None = None
                  ) -> PackedBlocks:
    """One forward over clean sequences (ragged: a list of 1-D tensors, or a [bs, n] tensor) with a mask block after
    each anchor. split_hidden[i], if given, is sequence i's hidden states entering the split layer
    (`ReferenceEngine.split_hidden_states`), so the layers below it are not run again."""
    sequences = list(sequences)
    flat = torch.cat(sequences)
    lengths = torch.tensor([len(x) for x in sequences], device=flat.device)
    B = engine.block_size
    layout = build_layout(torch.zeros_like(lengths), lengths, anchors, B)
    hidden = engine.forward(layout, flat, None, None if split_hidden is None else torch.cat(split_hidden))

    blocks = torch.arange(len(layout.block_request), device=flat.device)
    rows = layout.block_rows(blocks)[:, 1:]
    owner, anchor = layout.block_request, layout.block_anchor
    start = torch.cumsum(lengths, 0) - lengths  # of each sequence in `flat`
    n = lengths[owner]
    target_pos = anchor[:, None] + 1 + torch.arange(1, B, device=flat.device)
    return PackedBlocks(
        hidden=hidden[rows], bonus=flat[start[owner] + anchor + 1],
        targets=flat[start[owner, None] + target_pos.minimum(n[:, None] - 1)], valid=target_pos < n[:, None],
        owner=owner, anchor=anchor,
    )


def packed_draft_logits(engine, sequences, anchors: list[list[int]], split_hidden: list[Tensor] | None = None
                        ) -> tuple[PackedBlocks, Tensor]:
    """`packed_blocks` and the calibrated draft logits [blocks, B-1, V] of their rows 1..B-1, calibrated with the
    true bonus: what the loss scores (and what decoding drafts at the same states)."""
    blocks = packed_blocks(engine, sequences, anchors, split_hidden)
    return blocks, engine.draft_logits(blocks.hidden, blocks.bonus).float()


def mask_block_loss(engine, sequences, anchors: list[list[int]], decay: float = 1.0,
                    split_hidden: list[Tensor] | None = None) -> Tensor:
    """Mean (decay-weighted) cross-entropy of the draft rows of every block. `engine` is a ReferenceEngine over the
    frozen target with the adapter being trained; the rest as for `packed_blocks`."""
    blocks, logits = packed_draft_logits(engine, sequences, anchors, split_hidden)
    steps = torch.arange(blocks.targets.shape[1], dtype=torch.float32, device=logits.device)
    weights = blocks.valid * decay ** steps
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks.targets.reshape(-1), reduction="none")
    return (loss * weights.reshape(-1)).sum() / weights.sum().clamp(min=1e-9)
