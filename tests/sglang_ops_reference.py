"""Compares every op of the CPU `sgl_kernel` shim with SGLang's own Triton kernel for it, run by Triton's interpreter
on CPU (TRITON_INTERPRET=1), on random inputs. Run as a script; prints {op: error message or null} as JSON.

Inputs follow SGLang's producers: EAGLE draft trees come from the same top-k expansion and `organize_draft_results`
as `eagle_worker`, NGRAM masks from random trees. The KV row copy has no interpretable Triton kernel (it takes raw
pointers), so it is compared with SGLang's `move_kv_cache_native`. The top-k / top-p renormalisations are compared with
SGLang's Triton fallback for them (`renorm_triton`, which otherwise insists on a GPU tensor), and the KV slots each
EAGLE draft step reads on torch_native (`patches/eagle_torch_native_draft.py`) with SGLang's own
`generate_draft_decode_kv_indices`. `tree_speculative_sampling_target_only` has no Triton kernel (CUDA only): it is
checked against the target distribution in test_sglang_eagle_cpu.py.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
os.environ.pop("SGLANG_USE_CPU_ENGINE", None)  # import SGLang's GPU code paths, whose kernels are the reference

import json
import sys
import traceback

import torch

from flexdraft_sgl.patches.eagle_torch_native_draft import draft_kv_indices
from flexdraft_sgl.sglang.cpu import SHIM_DIR

sys.path.insert(0, str(SHIM_DIR))  # reconstruct_tree.py imports sgl_kernel.speculative on a machine without CUDA

import sgl_kernel as shim  # noqa: E402
from sglang.kernels.ops.sampling import renorm_triton  # noqa: E402
from sglang.kernels.ops.speculative import (  # noqa: E402
    cache_locs, eagle, multi_layer_eagle, reconstruct_tree, spec_tree,
)
from sglang.srt.mem_cache import allocation  # noqa: E402
from sglang.srt.mem_cache.memory_pool import move_kv_cache_native  # noqa: E402
from sglang.srt.speculative.eagle_utils import organize_draft_results  # noqa: E402
from sglang.srt.utils import next_power_of_2  # noqa: E402

TRIALS = 5


def same(name, ours, ref):
    for i, (a, b) in enumerate(zip(ours, ref)):
        if not torch.equal(a, b):
            raise AssertionError(f"{name}: output {i} differs\nshim:   {a.tolist()}\ntriton: {b.tolist()}")


def pool(g, reqs=6, pool_len=40):
    req_to_token = torch.randperm(reqs * pool_len, generator=g).view(reqs, pool_len).to(torch.int32)
    bs = int(torch.randint(1, reqs + 1, (1,), generator=g))
    return req_to_token, torch.randperm(reqs, generator=g)[:bs], bs


def spans(g, bs, pool_len, dtype=torch.int64):
    start = torch.randint(0, pool_len // 2, (bs,), generator=g)
    end = start + torch.randint(0, pool_len // 2, (bs,), generator=g)
    return start.to(dtype), end.to(dtype)


def check_assign_req_to_token_pool(g):
    req_to_token, rpi, bs = pool(g)
    start, end = spans(g, bs, req_to_token.shape[1], torch.int32)
    locs = torch.randperm(1000, generator=g)[: int((end - start).sum())]
    ours, ref = req_to_token.clone(), req_to_token.clone()
    shim.assign_req_to_token_pool_cpu(rpi, ours, start, end, locs, ours.shape[1])
    allocation.assign_req_to_token_pool[(bs,)](rpi, ref, start, end, locs, ref.shape[1], next_power_of_2(bs))
    same("assign_req_to_token_pool", [ours], [ref])


def check_assign_extend_cache_locs(g):
    req_to_token, rpi, bs = pool(g)
    start, end = spans(g, bs, req_to_token.shape[1])
    n = int((end - start).sum())
    ours, ref = torch.full((n + 3,), -1), torch.full((n + 3,), -1)
    shim.assign_extend_cache_locs_cpu(rpi, req_to_token, start, end, ours, req_to_token.shape[1])
    cache_locs.assign_extend_cache_locs[(bs,)](rpi, req_to_token, start, end, ref, req_to_token.shape[1],
                                               next_power_of_2(bs))
    same("assign_extend_cache_locs", [ours], [ref])


def check_assign_draft_cache_locs_contiguous(g):
    req_to_token, rpi, bs = pool(g)
    topk, steps = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    seq_lens = torch.randint(0, req_to_token.shape[1] - topk * steps, (bs,), generator=g)
    ours, ref = torch.full((bs * topk * steps,), -1), torch.full((bs * topk * steps,), -1)
    shim.assign_draft_cache_locs_contiguous_cpu(rpi, req_to_token, seq_lens, ours, req_to_token.shape[1], topk, steps)
    cache_locs.assign_draft_cache_locs_contiguous[(bs,)](rpi, req_to_token, seq_lens, ref, req_to_token.shape[1], topk,
                                                         steps, BS=bs)
    same("assign_draft_cache_locs_contiguous", [ours], [ref])


def check_fill_accept_out_cache_loc(g):
    bs, steps = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
    accept_index = torch.arange(bs * steps, dtype=torch.int32).view(bs, steps)
    accept_index[torch.rand(bs, steps, generator=g) < 0.4] = -1
    out_cache_loc = torch.randperm(500, generator=g)[: bs * steps]
    ours, ref = torch.full((bs * steps,), -1), torch.full((bs * steps,), -1)
    shim.fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, ours)
    eagle.fill_accept_out_cache_loc[(bs * steps,)](accept_index, out_cache_loc, ref, next_power_of_2(bs * steps))
    same("fill_accept_out_cache_loc", [ours], [ref])


def check_fill_bonus_tokens(g):
    bs, stride = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
    accept_tokens = torch.randint(0, 1000, (bs, stride), generator=g, dtype=torch.int32)
    accept_lens = torch.randint(1, stride + 1, (bs,), generator=g, dtype=torch.int32)
    ours, ref = torch.zeros(bs, dtype=torch.int32), torch.zeros(bs, dtype=torch.int32)
    shim.fill_bonus_tokens_cpu(accept_tokens, accept_lens, ours, stride)
    eagle.fill_bonus_tokens[(bs,)](accept_tokens, accept_lens, ref, stride)
    same("fill_bonus_tokens", [ours], [ref])


def check_rotate_input_ids(g):
    bs = int(torch.randint(1, 6, (1,), generator=g))
    lens = torch.randint(0, 7, (bs,), generator=g)
    starts = torch.cumsum(lens, 0) - lens
    ids = torch.randint(0, 1000, (int(lens.sum()),), generator=g)
    new = torch.randint(1000, 2000, (bs,), generator=g)
    for select in (None, torch.where(lens > 0, starts, 0)):
        ours, ref = ids.clone(), ids.clone()
        shim.rotate_input_ids_cpu(ours, starts, lens, new, select)
        multi_layer_eagle.rotate_input_ids_kernel[(bs,)](ref, starts, lens, new, select, BLOCK_SIZE=8)
        same("rotate_input_ids", [ours], [ref])


def eagle_tree(g, bs, topk, steps, num_draft, vocab=4):
    """parent_list, top_scores_index and draft tokens as EAGLE's draft loop produces them (random draft model)."""
    probs = torch.rand(bs, topk, generator=g).softmax(-1)
    scores_list, tokens_list = [probs.unsqueeze(1)], [torch.randint(0, vocab, (bs, topk), generator=g)]
    parents_list, scores = [torch.arange(-1, topk).expand(bs, -1)], probs
    for i in range(1, steps):
        expand = scores.unsqueeze(2) * torch.rand(bs, topk, topk, generator=g).softmax(-1)
        scores, index = expand.flatten(1).topk(topk, dim=-1)
        scores_list.append(expand)
        tokens_list.append(torch.randint(0, vocab, (bs, topk * topk), generator=g))
        parents_list.append(index + topk * topk * (i - 1) + topk)
    return organize_draft_results(scores_list, tokens_list, parents_list, num_draft)


def built_trees(g, mode):
    topk, steps = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 5, (1,), generator=g))
    bs = int(torch.randint(1, 4, (1,), generator=g))
    num_draft = int(torch.randint(2, topk * (steps - 1) + topk + 2, (1,), generator=g))
    parent_list, selected, drafts = eagle_tree(g, bs, topk, steps, num_draft)
    seq_lens = torch.randint(1, 6, (bs,), generator=g)
    mask_len = num_draft * num_draft * bs + (int(seq_lens.sum()) * num_draft if mode == 0 else 0)
    outs = []
    for build in (shim.build_tree_kernel_efficient_cpu, spec_tree.sgl_build_tree_kernel_triton):
        mask = torch.full((mask_len,), True)
        positions = torch.full((bs * num_draft,), -1)
        index, next_token, next_sibling = torch.full((3, bs, num_draft), -1).unbind(0)
        build(parent_list, selected, seq_lens, mask, positions, index, next_token, next_sibling, topk, steps,
              num_draft, spec_tree.TreeMaskMode(mode))
        outs.append([mask, positions, index, next_token, next_sibling])
    bonus = torch.randint(0, 4, (bs, 1), generator=g)
    return outs, torch.cat([bonus, drafts], 1), steps


def check_build_tree_kernel_efficient(g):
    for mode in (0, 1):
        (ours, ref), _, _ = built_trees(g, mode)
        same(f"build_tree_kernel_efficient (mode {mode})", ours, ref)


def check_verify_tree_greedy(g):
    (tree, _), candidates, steps = built_trees(g, 1)
    _, _, index, next_token, next_sibling = tree
    bs, num_draft = candidates.shape
    target = torch.randint(0, 4, (bs, num_draft), generator=g)  # a 4-token vocabulary: many matches
    outs = []
    for verify in (shim.verify_tree_greedy_cpu, spec_tree.verify_tree_greedy_triton):
        predicts = torch.zeros(bs * num_draft, dtype=torch.int32)
        accept_index = torch.full((bs, steps + 1), -1, dtype=torch.int32)
        accept_num = torch.zeros(bs, dtype=torch.int32)
        verify(predicts, accept_index, accept_num, candidates, index, next_token, next_sibling, target)
        outs.append([predicts, accept_index, accept_num])
    same("verify_tree_greedy", *outs)


def ngram_mask(g, bs, n):
    """Random trees over n nodes (node 0 the root, parents earlier): mask[b, i, j] = j is i or an ancestor of i."""
    mask = torch.zeros(bs, n, n, dtype=torch.bool)
    for b in range(bs):
        mask[b, 0, 0] = True
        for i in range(1, n):
            parent = int(torch.randint(0, i, (1,), generator=g))
            mask[b, i] = mask[b, parent]
            mask[b, i, i] = True
    return mask.flatten()


def check_reconstruct_indices_from_tree_mask(g):
    bs, n = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
    mask, seq_lens = ngram_mask(g, bs, n), torch.randint(1, 50, (bs,), generator=g)
    outs = []
    triton = reconstruct_tree.reconstruct_indices_from_tree_mask_triton
    for rebuild in (shim.reconstruct_indices_from_tree_mask, triton):
        out = [torch.full((bs * n,), -7), *torch.full((3, bs, n), -7).unbind(0)]
        rebuild(mask, seq_lens, *out, bs, n)
        outs.append(out)
    same("reconstruct_indices_from_tree_mask", *outs)


def close(name, ours, ref):
    """Same support, same values up to the rounding of the normalising sums."""
    if not torch.equal(ours > 0, ref > 0) or not torch.allclose(ours, ref, atol=1e-6):
        raise AssertionError(f"{name} differs\nshim:   {ours.tolist()}\ntriton: {ref.tolist()}")


def check_top_k_renorm_prob(g):
    probs = (torch.rand(5, 37, generator=g) * 4).softmax(-1)  # no ties: the rules agree exactly
    top_k = torch.randint(1, 40, (5,), generator=g)
    ref = renorm_triton.top_k_renorm_probs_triton(probs, top_k)
    close("top_k_renorm_prob", shim.top_k_renorm_prob(probs, top_k), ref)


def check_top_p_renorm_prob(g):
    probs = (torch.rand(5, 37, generator=g) * 4).softmax(-1)
    top_p = torch.rand(5, generator=g).clamp(min=0.05)
    ref = renorm_triton.top_p_renorm_probs_triton(probs, top_p)
    close("top_p_renorm_prob", shim.top_p_renorm_prob(probs, top_p), ref)


def check_draft_kv_indices(g):
    req_to_token, rpi, bs = pool(g)
    topk, steps = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(2, 5, (1,), generator=g))
    seq_lens = torch.randint(1, req_to_token.shape[1] - topk * steps, (bs,), generator=g)
    kv_indices = torch.full((steps, int(seq_lens.sum() + bs * steps) * topk), -1)
    kv_indptr = torch.zeros((steps, bs * topk + 1), dtype=torch.int32)
    cache_locs.generate_draft_decode_kv_indices[(steps, bs, topk)](
        rpi, req_to_token, seq_lens, kv_indices, kv_indptr, seq_lens.repeat_interleave(topk), req_to_token.shape[1],
        kv_indices.shape[1], kv_indptr.shape[1], next_power_of_2(bs), next_power_of_2(steps),
        next_power_of_2(bs * topk), 1)
    for step in range(steps - 1):  # the last step runs no forward
        slots, valid = draft_kv_indices(req_to_token, rpi, seq_lens, topk, steps, step)
        same(f"draft_kv_indices (step {step})", [slots[valid]], [kv_indices[step, : int(valid.sum())]])


def check_copy_all_layer_kv_cache(g):
    buffers = [torch.randn(30, 2, 4, generator=g) for _ in range(4)] + [torch.randn(30, 3, generator=g).half()]
    src, tgt = torch.randperm(30, generator=g)[:7], torch.randperm(30, generator=g)[:7]
    ref = [b.clone() for b in buffers]
    move_kv_cache_native(ref[:2], ref[2:4], tgt, src)
    ref[4][tgt] = ref[4][src]
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in buffers])
    shim.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    same("copy_all_layer_kv_cache", buffers, ref)


def main():
    results = {}
    renorm_triton._prepare_probs = lambda probs: probs.float().contiguous()  # its kernels interpret fine on CPU
    for name, check in sorted((k[len("check_"):], v) for k, v in globals().items() if k.startswith("check_")):
        g = torch.Generator().manual_seed(0)
        try:
            for _ in range(TRIALS):
                check(g)
            results[name] = None
        except Exception:
            results[name] = traceback.format_exc()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
