"""Step layouts and the three mask encodings, checked against the visibility rule written out independently."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from flexdraft_sgl.core.layout import (
    build_layout, decode_layout, draft_layout, parallel_layout, prefill_layout, verify_layout,
)
from flexdraft_sgl.core.masks import (
    dense_mask, flashinfer_mask, full_mask, full_mask_indptr, padded_rows, unpack_flashinfer_mask,
)


def rule(layout, i):
    """Request i's W x (P + W) visibility, straight from FLEXDRAFT.md, one row at a time."""
    start, end = int(layout.request_row_start[i]), int(layout.request_row_start[i + 1])
    P = int(layout.prefix_lens[i])
    rows = range(start, end)
    out = torch.zeros(end - start, P + end - start, dtype=torch.bool)
    for a, q in enumerate(rows):
        out[a, :P] = True
        q_block, q_anchor = int(layout.row_block[q]), int(layout.row_anchor[q])
        for b, k in enumerate(rows):
            k_block, k_anchor = int(layout.row_block[k]), int(layout.row_anchor[k])
            if q_block < 0:  # candidate: causal over candidates, never a mask row
                out[a, P + b] = k_block < 0 and k_anchor <= q_anchor
            else:  # mask row: candidates up to its anchor, and its own block
                out[a, P + b] = (k_block < 0 and k_anchor <= q_anchor) or k_block == q_block
    return out


def random_layout(seed):
    rnd = random.Random(seed)
    bs = rnd.randint(1, 5)
    B = rnd.randint(2, 6)
    prefix = [rnd.randint(0, 9) for _ in range(bs)]
    n = [rnd.randint(1, 6) for _ in range(bs)]
    anchors = [sorted(rnd.sample(range(k), rnd.randint(0, k))) for k in n]
    return build_layout(prefix, n, anchors, B)


def test_parallel_layout_positions_and_anchors():
    lay = parallel_layout([5, 2], [2, 1], block_size=4)
    # request 0: 3 candidates at 5,6,7 then blocks after c0,c1,c2 at 6..9, 7..10, 8..11
    r0 = slice(0, 3 + 3 * 4)
    assert lay.row_position[r0].tolist() == [5, 6, 7, 6, 7, 8, 9, 7, 8, 9, 10, 8, 9, 10, 11]
    assert lay.row_anchor[r0].tolist() == [0, 1, 2] + [0] * 4 + [1] * 4 + [2] * 4
    assert lay.row_block[r0].tolist() == [-1, -1, -1] + [0] * 4 + [1] * 4 + [2] * 4
    # request 1 starts after request 0's 15 rows: 2 candidates, 2 blocks
    assert lay.request_row_start.tolist() == [0, 15, 15 + 2 + 8]
    assert lay.row_position[15:17].tolist() == [2, 3]
    # block after candidate 1 of request 1: its rows 1..3 give the drafts after the bonus at position 2+1+1
    rows = lay.block_rows(lay.block_after(torch.tensor([0, 1])))
    assert lay.row_position[rows[1]].tolist() == [4, 5, 6, 7]
    assert rows[0].tolist() == list(range(3, 7))


def test_step_kinds():
    pre = prefill_layout([4, 2], block_size=3)
    assert pre.num_candidates.tolist() == [4, 2] and pre.block_anchor.tolist() == [3, 1]
    assert pre.row_position[pre.mask_rows].tolist() == [4, 5, 6, 2, 3, 4]
    cached = prefill_layout([6], block_size=3, cached_lens=[4])
    assert cached.row_position[cached.candidate_rows].tolist() == [4, 5]
    assert draft_layout([7], 3).row_position.tolist() == [7, 8, 9, 10]
    assert not verify_layout([7], [2], 3).has_blocks and verify_layout([7], [2], 3).num_rows == 3
    assert decode_layout([7, 1], 3).row_position.tolist() == [7, 1]
    with pytest.raises(ValueError):
        build_layout([0], [2], [[2]], 3)  # anchor past the candidates


@pytest.mark.parametrize("seed", range(25))
def test_three_encodings_encode_the_rule(seed):
    lay = random_layout(seed)
    expected = [rule(lay, i) for i in range(lay.batch_size)]
    # dense: cut each request's block back out of the padded form
    dense = dense_mask(lay)
    pmax = int(lay.prefix_lens.max())
    for i, exp in enumerate(expected):
        W, P = exp.shape[0], int(lay.prefix_lens[i])
        got = torch.cat([dense[i, :W, :P], dense[i, :W, pmax:pmax + W]], 1)
        assert torch.equal(got, exp)
        assert not dense[i, :W, P:pmax].any()  # cache slots past the prefix are never read
        assert not dense[i, :W, pmax + W:].any()
    # SGLang FULL_MASK: row-major blocks concatenated
    flat = full_mask(lay)
    assert torch.equal(flat, torch.cat([e.flatten() for e in expected]))
    assert full_mask_indptr(lay)[-1] == len(flat)
    # FlashInfer packed bits, little bit order, byte indptr per request
    packed, byte_indptr = flashinfer_mask(lay)
    sizes = [math.ceil(e.numel() / 8) for e in expected]
    assert byte_indptr.tolist() == [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    assert byte_indptr.dtype == torch.int32 and packed.dtype == torch.uint8
    assert torch.equal(unpack_flashinfer_mask(packed, byte_indptr, full_mask_indptr(lay)), flat)


def test_packbits_matches_numpy_little():
    np = pytest.importorskip("numpy")
    from flexdraft_sgl.core.masks import packbits_little

    bits = torch.rand(77, generator=torch.Generator().manual_seed(3)) > 0.5
    assert packbits_little(bits).tolist() == np.packbits(bits.numpy(), bitorder="little").tolist()


@pytest.mark.parametrize("seed", range(10))
def test_dense_mask_attention_equals_row_by_row(seed):
    """What the engine computes (one SDPA under the dense mask, padded) equals attention of each row over exactly
    the keys the rule lets it see."""
    lay = random_layout(seed)
    g = torch.Generator().manual_seed(seed)
    heads, hd = 2, 8
    pmax = int(lay.prefix_lens.max())
    cache_k = torch.randn(lay.batch_size, pmax, heads, hd, generator=g)
    cache_v = torch.randn(lay.batch_size, pmax, heads, hd, generator=g)
    q = torch.randn(lay.num_rows, heads, hd, generator=g)
    k = torch.randn(lay.num_rows, heads, hd, generator=g)
    v = torch.randn(lay.num_rows, heads, hd, generator=g)
    index, valid = padded_rows(lay)
    keys = torch.cat([cache_k, k[index]], 1).transpose(1, 2)
    values = torch.cat([cache_v, v[index]], 1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q[index].transpose(1, 2), keys, values, attn_mask=dense_mask(lay)[:, None])
    out = out.transpose(1, 2)[valid]

    for i in range(lay.batch_size):
        vis = rule(lay, i)
        P, start = int(lay.prefix_lens[i]), int(lay.request_row_start[i])
        K = torch.cat([cache_k[i, :P], k[start:start + vis.shape[0]]])
        V = torch.cat([cache_v[i, :P], v[start:start + vis.shape[0]]])
        for a in range(vis.shape[0]):
            sel = vis[a]
            scores = torch.einsum("hd,khd->hk", q[start + a], K[sel]) / math.sqrt(hd)
            ref = torch.einsum("hk,khd->hd", scores.softmax(-1), V[sel])
            torch.testing.assert_close(out[start + a], ref, rtol=1e-5, atol=1e-5)
