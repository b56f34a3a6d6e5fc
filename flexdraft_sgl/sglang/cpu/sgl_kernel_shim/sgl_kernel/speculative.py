"""Pure-torch versions of the CPU speculative-decoding ops of sgl_kernel (its `csrc/cpu` kernels).

Each function keeps the signature that SGLang 0.5.23 calls on CPU and the semantics of SGLang's own Triton kernels
(`sglang/kernels/ops/speculative/`, `sglang/srt/mem_cache/allocation.py`): outputs are written in place.
Sequential tree walks run as Python loops over `.tolist()` copies; they touch a few dozen entries per request.
"""

from __future__ import annotations

from typing import Optional

import torch


def _ranges(start: torch.Tensor, end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For the half-open ranges [start[i], end[i]) laid end to end: (owning i, position) of every element."""
    lens = (end - start).long()
    owner = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    first = torch.cumsum(lens, 0) - lens
    pos = start.long()[owner] + torch.arange(owner.numel(), device=lens.device) - first[owner]
    return owner, pos


def assign_req_to_token_pool_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len):
    """req_to_token[req_pool_indices[i], start[i]:end[i]] = the next end[i]-start[i] entries of out_cache_loc."""
    owner, pos = _ranges(start_offset, end_offset)
    req_to_token[req_pool_indices.long()[owner], pos] = out_cache_loc[: owner.numel()].to(req_to_token.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices, req_to_token, start_offset, end_offset, out_cache_loc, pool_len):
    """Gather req_to_token[req_pool_indices[i], start[i]:end[i]] for every i, end to end, into out_cache_loc."""
    owner, pos = _ranges(start_offset, end_offset)
    out_cache_loc[: owner.numel()] = req_to_token[req_pool_indices.long()[owner], pos].to(out_cache_loc.dtype)


def assign_draft_cache_locs_contiguous_cpu(req_pool_indices, req_to_token, seq_lens, out_cache_loc, pool_len, topk,
                                           num_steps):
    """Row i of out_cache_loc (topk*num_steps wide) = the topk*num_steps slots of request i from seq_lens[i] on."""
    width = topk * num_steps
    cols = seq_lens.long()[:, None] + torch.arange(width, device=seq_lens.device)
    out_cache_loc.view(-1, width)[:] = req_to_token[req_pool_indices.long()[:, None], cols]


def fill_accept_out_cache_loc_cpu(accept_index, out_cache_loc, accept_out_cache_loc):
    """Compact out_cache_loc at the accepted indices (-1 = rejected), in order, to the front of the output."""
    index = accept_index.flatten().long()
    index = index[index > -1]
    accept_out_cache_loc[: index.numel()] = out_cache_loc[index]


def fill_bonus_tokens_cpu(accept_tokens, accept_lens, bonus_tokens, accept_stride):
    """bonus_tokens[i] = the last accepted token of request i (accept_lens counts the bonus token)."""
    rows = torch.arange(accept_lens.numel(), device=accept_lens.device)
    bonus_tokens[:] = accept_tokens.flatten()[rows * accept_stride + accept_lens.long() - 1]


def rotate_input_ids_cpu(input_ids, extend_start_loc, extend_seq_lens, topk_index,
                         select_index: Optional[torch.Tensor] = None):
    """Shift each request's extend segment left by one and write its new token at the end (or at select_index)."""
    starts, lens, new = extend_start_loc.tolist(), extend_seq_lens.tolist(), topk_index.tolist()
    selects = select_index.tolist() if select_index is not None else None
    for i, (start, n) in enumerate(zip(starts, lens)):
        if n > 1:
            input_ids[start : start + n - 1] = input_ids[start + 1 : start + n].clone()
        if n > 0:
            input_ids[selects[i] if selects is not None else start + n - 1] = new[i]


def verify_tree_greedy_cpu(predicts, accept_index, accept_token_num, candidates, retrive_index, retrive_next_token,
                           retrive_next_sibling, target_predict):
    """Walk each draft tree from its root, at every depth accepting the first child whose token equals the target's
    argmax at the last accepted node. predicts (flat) gets the target token at every accepted node; accept_index[b]
    lists the accepted flat indices (root first; the caller pre-fills -1); accept_token_num[b] counts the drafts."""
    num_steps = accept_index.shape[1]
    cand, index = candidates.tolist(), retrive_index.tolist()
    next_token, next_sibling = retrive_next_token.tolist(), retrive_next_sibling.tolist()
    target = target_predict.flatten().tolist()
    for b in range(len(cand)):
        last = index[b][0]
        accept_index[b, 0] = last
        accepted, cur = 0, 0
        for _ in range(1, num_steps):
            cur = next_token[b][cur]
            while cur != -1 and cand[b][cur] != target[last]:
                cur = next_sibling[b][cur]
            if cur == -1:
                break
            predicts[last] = target[last]
            accepted += 1
            accept_index[b, accepted] = index[b][cur]
            last = index[b][cur]
        accept_token_num[b] = accepted
        predicts[last] = target[last]


def _find_node(selected: list, token_idx: int) -> int:
    return selected.index(token_idx) if token_idx in selected else -1


def build_tree_kernel_efficient_cpu(parent_list, selected_index, verified_seq_len, tree_mask, positions,
                                    retrive_index, retrive_next_token, retrive_next_sibling, topk, depth,
                                    draft_token_num, tree_mask_mode):
    """Build an EAGLE draft tree's retrieval links (first child / next sibling), positions and attention mask.

    tree_mask_mode 1 (QLEN_ONLY) writes bs*W*W entries; 0 (FULL_MASK) writes only each row's W tree columns of the
    [seq_len + W]-wide rows (the caller pre-fills the prefix columns). retrive_next_* come pre-filled with -1.
    """
    if tree_mask_mode not in (0, 1):
        raise ValueError(f"build_tree_kernel_efficient_cpu: tree_mask_mode {tree_mask_mode} is not supported")
    n = draft_token_num
    parents, selected, seq_lens = parent_list.tolist(), selected_index.tolist(), verified_seq_len.tolist()
    flat_pos, flat_index = positions.view(-1), retrive_index.view(-1)
    flat_next, flat_sibling, mask = retrive_next_token.view(-1), retrive_next_sibling.view(-1), tree_mask.view(-1)
    mask_start = 0
    for b, seq_len in enumerate(seq_lens):
        off, sel = b * n, selected[b]
        flat_pos[off] = seq_len
        flat_index[off : off + n] = torch.arange(off, off + n)
        for i in range(n - 1, 0, -1):
            parent_tb = sel[i - 1] // topk
            parent_pos = 0
            if parent_tb > 0:
                found = _find_node(sel, parents[b][parent_tb])
                if found < 0:
                    continue  # malformed tree: the CPU kernel warns and skips the node
                parent_pos = found + 1
            first_child = int(flat_next[off + parent_pos])
            flat_next[off + parent_pos] = i
            if first_child != -1:
                flat_sibling[off + i] = first_child
        row_width = n if tree_mask_mode == 1 else seq_len + n
        row_skip = 0 if tree_mask_mode == 1 else seq_len
        for tid in range(n):
            row = mask_start + tid * row_width + row_skip
            mask[row : row + n] = False
            mask[row] = True  # every node sees the root
            if tid == 0:
                continue
            steps, cur = 0, tid - 1
            while steps < depth:  # a valid root-ward walk has at most `depth` steps
                steps += 1
                mask[row + cur + 1] = True
                parent_tb = sel[cur] // topk
                if parent_tb == 0:
                    break
                cur = _find_node(sel, parents[b][parent_tb])
                if cur < 0:
                    break
            flat_pos[off + tid] = steps + seq_len
        mask_start += n * row_width


def reconstruct_indices_from_tree_mask(tree_mask, verified_seq_len, positions, retrive_index, retrive_next_token,
                                       retrive_next_sibling, batch_size, draft_token_num):
    """NGRAM verify metadata from a bs*W*W ancestor mask (mask[b, i, j]: node j is an ancestor of node i):
    position = #strict ancestors + seq_len, parent = the latest ancestor, first child = the earliest later node that
    has this node as ancestor, next sibling = the earliest later node with the same parent (-1 for roots)."""
    n = draft_token_num
    m = tree_mask.view(batch_size, n, n).bool()
    idx = torch.arange(n, device=m.device)
    ancestors = m & (idx[None, :] < idx[:, None])  # [b, i, j]: j < i is an ancestor of i
    positions.view(batch_size, n)[:] = ancestors.sum(-1) + verified_seq_len.view(-1, 1)
    retrive_index.view(batch_size, n)[:] = torch.arange(batch_size * n, device=m.device).view(batch_size, n)
    parent = torch.where(ancestors, idx, -1).max(-1).values  # [b, i]
    child = torch.where(ancestors, idx[:, None], n).min(1).values  # [b, j]: earliest i with ancestor j
    retrive_next_token.view(batch_size, n)[:] = torch.where(child < n, child, -1)
    later = idx[:, None] > idx[None, :]  # [k, t]: k after t
    same = (parent[:, :, None] == parent[:, None, :]) & later  # [b, k, t]
    sibling = torch.where(same, idx[:, None], n).min(1).values  # [b, t]
    retrive_next_sibling.view(batch_size, n)[:] = torch.where((parent >= 0) & (sibling < n), sibling, -1)


def _sample_residual(residual: torch.Tensor, coin: float) -> int:
    """Inverse-CDF draw from unnormalised weights with a [0, 1) coin; when rounding leaves the coin past the total,
    the last token with weight (or the last token), as in FlashInfer's DeviceSamplingFromProb."""
    cdf = residual.cumsum(0)
    hit = (cdf > coin * float(cdf[-1])).nonzero()
    if len(hit):
        return int(hit[0])
    valid = (residual > 0).nonzero()
    return int(valid[-1]) if len(valid) else residual.numel() - 1


def tree_speculative_sampling_target_only(predicts, accept_index, accept_token_num, candidates, retrive_index,
                                          retrive_next_token, retrive_next_sibling, uniform_samples,
                                          uniform_samples_for_final_sampling, target_probs, draft_probs,
                                          threshold_single: float = 1.0, threshold_acc: float = 1.0,
                                          deterministic: bool = True):
    """Speculative sampling over a draft tree whose drafts carry no probabilities (SGLang's CUDA kernel
    `TreeSpeculativeSamplingTargetOnly`, sglang/kernels/jit/include/sgl_kernel/speculative/sampling.cuh).

    At each accepted node the children are tried in sibling order with one coin u: the k-th child is accepted when
    u < p(c_1) + ... + p(c_k) under the node's target distribution p, i.e. when an inverse-CDF draw from p that
    lists the children first lands on it. Rejected children get draft_probs = p, so the final token is drawn from
    relu(p - draft_probs) at the last accepted node: p without the rejected children. Every emitted token thus
    follows the target distribution exactly (with the default thresholds of 1 and siblings carrying distinct tokens,
    as EAGLE's top-k and NGRAM's trie give them). Outputs as verify_tree_greedy_cpu;
    draft_probs is scratch space, modified in place. `deterministic` is part of the op's signature; this version is
    deterministic given the coins either way."""
    bs, num_draft = candidates.shape
    num_steps = accept_index.shape[1]
    probs = target_probs.reshape(bs * num_draft, -1)
    scratch = draft_probs.reshape(bs * num_draft, -1)
    cand, index = candidates.tolist(), retrive_index.tolist()
    next_token, next_sibling = retrive_next_token.tolist(), retrive_next_sibling.tolist()
    coins, final_coins = uniform_samples.tolist(), uniform_samples_for_final_sampling.tolist()
    for b in range(bs):
        row, coin, mass = b * num_draft, coins[b][0], 0.0
        last = index[b][0]
        accept_index[b, 0] = last
        accepted, cur = 0, 0
        for _ in range(1, num_steps):
            cur = next_token[b][cur]
            while cur != -1:
                token = cand[b][cur]
                p = float(probs[row, token])
                mass += p
                if p > 0 and (coin < mass / threshold_acc or p >= threshold_single):
                    row, coin, mass = b * num_draft + cur, coins[b][cur], 0.0
                    predicts[last] = token
                    accepted += 1
                    accept_index[b, accepted] = index[b][cur]
                    last = index[b][cur]
                    break
                scratch[row, token] = probs[row, token]
                cur = next_sibling[b][cur]
            if cur == -1:
                break
        accept_token_num[b] = accepted
        residual = probs[row] if accepted == num_steps - 1 else (probs[row] - scratch[row]).clamp(min=0)
        predicts[last] = _sample_residual(residual, final_coins[b])
