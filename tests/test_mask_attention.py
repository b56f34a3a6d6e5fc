"""Ragged mask encodings and the two-part (paged prefix + ragged step rows) attention, checked on CPU against SDPA
over the dense mask, the form the reference engine uses."""

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
    dense_mask, full_mask, full_mask_indptr, packbits_segments, ragged_mask, ragged_packed_mask, unpack_flashinfer_mask,
)
from flexdraft_sgl.kernels import mask_attention
from flexdraft_sgl.kernels.mask_attention import (
    attend, attention_blocks_sdpa, attention_reference_dense, attention_torch, merge_attention_states,
)

LAYOUTS = {
    "prefill": lambda: prefill_layout([5, 3, 7], block_size=3),
    "prefill_cached": lambda: prefill_layout([9, 4], block_size=4, cached_lens=[6, 0]),
    "parallel_v0_b1": lambda: parallel_layout([4, 0], [0, 0], block_size=1),
    "parallel_v2_b4": lambda: parallel_layout([7, 2, 0], [2, 1, 3], block_size=4),
    "parallel_v3_b2": lambda: parallel_layout([11], [3], block_size=2),
    "draft": lambda: draft_layout([6, 1, 0], block_size=5),
    "verify": lambda: verify_layout([3, 8], [2, 4], block_size=4),
    "decode": lambda: decode_layout([5, 0, 2], block_size=4),
    "no_prefix_at_all": lambda: parallel_layout([0, 0], [1, 2], block_size=3),
}


def random_layout(seed):
    rnd = random.Random(seed)
    bs = rnd.randint(1, 4)
    n = [rnd.randint(1, 5) for _ in range(bs)]
    anchors = [sorted(rnd.sample(range(k), rnd.randint(0, k))) for k in n]
    return build_layout([rnd.randint(0, 12) for _ in range(bs)], n, anchors, rnd.randint(1, 5))


def make_inputs(layout, hq, hkv, seed, d=16):
    """Step tensors plus a KV pool whose prefix slots are scattered (shuffled slot ids, unused slots in between)."""
    g = torch.Generator().manual_seed(seed)
    rows, total_prefix = layout.num_rows, int(layout.prefix_lens.sum())
    num_slots = 2 * total_prefix + 3
    kv_indices = torch.randperm(num_slots, generator=g)[:total_prefix]
    kv_indptr = torch.zeros(layout.batch_size + 1, dtype=torch.long)
    kv_indptr[1:] = torch.cumsum(layout.prefix_lens, 0)
    return dict(
        q=torch.randn(rows, hq, d, generator=g), k=torch.randn(rows, hkv, d, generator=g),
        v=torch.randn(rows, hkv, d, generator=g), qo_indptr=layout.request_row_start,
        k_buffer=torch.randn(num_slots, hkv, d, generator=g), v_buffer=torch.randn(num_slots, hkv, d, generator=g),
        kv_indptr=kv_indptr, kv_indices=kv_indices,
    )


def sdpa_dense(layout, x, dense, scale=None):
    """SDPA over the dense mask, keys gathered request by request straight from the pool (independent of the module)."""
    bs, wmax = dense.shape[0], dense.shape[1]
    pmax = dense.shape[2] - wmax
    hq, hkv, d = x["q"].shape[1], x["k"].shape[1], x["q"].shape[2]
    Q = torch.zeros(bs, wmax, hq, d)
    K, V = torch.zeros(bs, pmax + wmax, hkv, d), torch.zeros(bs, pmax + wmax, hkv, d)
    for i in range(bs):
        slots = x["kv_indices"][int(x["kv_indptr"][i]) : int(x["kv_indptr"][i + 1])]
        a, b = int(layout.request_row_start[i]), int(layout.request_row_start[i + 1])
        Q[i, : b - a] = x["q"][a:b]
        K[i, : len(slots)], V[i, : len(slots)] = x["k_buffer"][slots], x["v_buffer"][slots]
        K[i, pmax : pmax + b - a], V[i, pmax : pmax + b - a] = x["k"][a:b], x["v"][a:b]
    out = F.scaled_dot_product_attention(
        Q.transpose(1, 2), K.transpose(1, 2), V.transpose(1, 2), attn_mask=dense[:, None], scale=scale,
        enable_gqa=hq != hkv,
    ).transpose(1, 2)
    return torch.cat([out[i, : int(w)] for i, w in enumerate(layout.rows_per_request)])


def bidirectional_dense(layout):
    """Dense mask for mask=None: the prefix and every row of the own request."""
    dense = dense_mask(layout).clone()
    wmax = dense.shape[1]
    valid = torch.arange(wmax)[None, :] < layout.rows_per_request[:, None]
    dense[:, :, -wmax:] = (valid[:, :, None] & valid[:, None, :]) | torch.diag_embed(~valid)
    return dense


CASES = [(name, build) for name, build in LAYOUTS.items()] + [
    (f"random{s}", lambda s=s: random_layout(s)) for s in range(6)
]


@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (4, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("name,build", CASES, ids=[c[0] for c in CASES])
def test_attention_torch_equals_sdpa_over_dense_mask(name, build, heads):
    layout = build()
    x = make_inputs(layout, *heads, seed=sum(name.encode()))
    mask, _ = ragged_mask(layout)
    expected = sdpa_dense(layout, x, dense_mask(layout))
    got = attention_torch(**x, mask=mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention_reference_dense(**x, dense=dense_mask(layout)), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attend(**x, mask=mask), got)  # CPU tensors: the torch path


@pytest.mark.parametrize("name", ["prefill_cached", "parallel_v2_b4", "no_prefix_at_all"])
def test_no_mask_means_rows_see_each_other(name):
    layout = LAYOUTS[name]()
    x = make_inputs(layout, 4, 2, seed=7)
    torch.testing.assert_close(attention_torch(**x), sdpa_dense(layout, x, bidirectional_dense(layout)))


def mask_block_inputs(prefix_lens, rows, hq, hkv, seed, d=16):
    """A step of mask blocks: `rows` rows per request, each seeing its prefix (scattered pool slots) and its block."""
    g = torch.Generator().manual_seed(seed)
    bs, total = len(prefix_lens), sum(prefix_lens)
    kv_indptr = torch.tensor([0, *prefix_lens]).cumsum(0)
    return dict(q=torch.randn(bs * rows, hq, d, generator=g), k=torch.randn(bs * rows, hkv, d, generator=g),
                v=torch.randn(bs * rows, hkv, d, generator=g), qo_indptr=torch.arange(bs + 1) * rows,
                k_buffer=torch.randn(2 * total + 3, hkv, d, generator=g),
                v_buffer=torch.randn(2 * total + 3, hkv, d, generator=g),
                kv_indptr=kv_indptr, kv_indices=torch.randperm(2 * total + 3, generator=g)[:total])


@pytest.mark.parametrize("prefix_lens,rows", [([9], 8), ([5, 0, 12], 4), ([0, 0], 3), ([7, 7, 7, 7], 1)])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)], ids=["gqa", "mha"])
def test_the_cpu_mask_block_path_equals_attention_torch(prefix_lens, rows, heads):
    x = mask_block_inputs(prefix_lens, rows, *heads, seed=len(prefix_lens) * rows)
    expected = attention_torch(**x, sm_scale=0.2)
    torch.testing.assert_close(attention_blocks_sdpa(**x, sm_scale=0.2), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attend(**x, sm_scale=0.2), expected, rtol=1e-5, atol=1e-5)  # what CPU runs
    half = {k: (t.bfloat16() if t.is_floating_point() else t) for k, t in x.items()}
    got = attention_blocks_sdpa(**half, sm_scale=0.2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


def test_the_cpu_mask_block_path_refuses_ragged_row_counts():
    layout = LAYOUTS["parallel_v2_b4"]()
    with pytest.raises(ValueError, match="same number of rows"):
        attention_blocks_sdpa(**make_inputs(layout, 4, 2, seed=1))


def test_long_steps_run_in_query_chunks(monkeypatch):
    layout = LAYOUTS["parallel_v2_b4"]()
    x = make_inputs(layout, 4, 2, seed=11)
    mask, _ = ragged_mask(layout)
    whole = attention_torch(**x, mask=mask)
    monkeypatch.setattr(mask_attention, "SCORE_BUDGET", 50)  # a few query rows per matmul
    torch.testing.assert_close(attention_torch(**x, mask=mask), whole)


def test_sm_scale_and_dtype():
    layout = LAYOUTS["parallel_v2_b4"]()
    x = make_inputs(layout, 4, 2, seed=3)
    mask, _ = ragged_mask(layout)
    expected = sdpa_dense(layout, x, dense_mask(layout), scale=0.3)
    torch.testing.assert_close(attention_torch(**x, mask=mask, sm_scale=0.3), expected, rtol=1e-5, atol=1e-5)
    half = {k: (t.bfloat16() if t.is_floating_point() else t) for k, t in x.items()}
    got = attention_torch(**half, mask=mask, sm_scale=0.3)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("name,build", CASES, ids=[c[0] for c in CASES])
def test_ragged_mask_is_the_step_block_of_full_mask(name, build):
    layout = build()
    flat, indptr = ragged_mask(layout)
    full, full_indptr = full_mask(layout), full_mask_indptr(layout)
    assert indptr[-1] == len(flat) and flat.dtype == torch.bool
    for i in range(layout.batch_size):
        w, p = int(layout.rows_per_request[i]), int(layout.prefix_lens[i])
        block = full[full_indptr[i] : full_indptr[i + 1]].view(w, p + w)
        assert block[:, :p].all()  # the prefix needs no mask: every row sees it
        assert torch.equal(flat[indptr[i] : indptr[i + 1]].view(w, w), block[:, p:])
    packed, byte_indptr = ragged_packed_mask(layout)
    assert packed.dtype == torch.uint8 and byte_indptr.dtype == torch.int32
    sizes = [math.ceil(int(w) ** 2 / 8) for w in layout.rows_per_request]
    assert byte_indptr.tolist() == [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    assert torch.equal(unpack_flashinfer_mask(packed, byte_indptr, indptr), flat)
    assert all(torch.equal(a, b) for a, b in zip(packbits_segments(flat, indptr), (packed, byte_indptr)))


def reference_attention(q, k, v, visible):
    """Per-row softmax attention over the visible keys, with its natural-log LSE. q [R, H, D], k/v [K, H, D]."""
    scores = torch.einsum("rhd,khd->rhk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("rhk,khd->rhd", torch.softmax(scores, -1).nan_to_num(0.0), v)
    return out, lse


@pytest.mark.parametrize("seed", range(4))
def test_merge_of_two_halves_equals_attention_over_union(seed):
    g = torch.Generator().manual_seed(seed)
    rows, keys, heads, d = 6, 10, 3, 8
    q, k, v = (torch.randn(n, heads, d, generator=g) for n in (rows, keys, keys))
    in_a = torch.rand(keys, generator=g) > 0.5
    in_a[0], in_a[1] = True, False
    visible = torch.rand(rows, keys, generator=g) > 0.3
    visible[:, :2] = True  # every row sees a key of each part
    visible[1] &= ~in_a  # row 1 sees nothing in part A: it must come out of B alone
    visible_a, visible_b = visible & in_a[None, :], visible & ~in_a[None, :]
    o_a, lse_a = reference_attention(q, k, v, visible_a)
    o_b, lse_b = reference_attention(q, k, v, visible_b)
    o, lse = merge_attention_states(o_a, lse_a, o_b, lse_b)
    o_ref, lse_ref = reference_attention(q, k, v, visible)
    torch.testing.assert_close(o, o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-5)


def test_merge_of_two_empty_parts_is_zero():
    o = torch.randn(2, 3, 4)
    empty = torch.full((2, 3), float("-inf"))
    out, lse = merge_attention_states(o, empty, o, empty)
    assert torch.equal(out, torch.zeros_like(o)) and torch.equal(lse, empty)
