"""Pure-torch top-k / top-p renormalisation (sgl_kernel's `top_k_renorm_prob` / `top_p_renorm_prob`).

SGLang 0.5.23 has no CPU kernel for them (`sglang/kernels/ops/sampling/renorm.py` leaves both None off CUDA, HIP, NPU
and MUSA); EAGLE-family verify calls them whenever a batch has a top-k or top-p request, and every greedy request in a
mixed batch is one (SamplingParams turns temperature 0 into top_k 1). The cut-offs are those of SGLang's own CPU
sampler (`top_k_top_p_min_p_sampling_from_probs_torch` in `srt/layers/sampler.py`): rank < k after a descending sort,
and mass before the token <= top_p. For untied probabilities they equal FlashInfer's (and SGLang's Triton fallback's)
threshold rules.
"""

from __future__ import annotations

import torch


def _per_row(value, rows: int, dtype) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype).reshape(-1).expand(rows)


def _renormalised(sorted_probs: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    kept = torch.zeros_like(sorted_probs).scatter_(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def top_k_renorm_prob(probs: torch.Tensor, top_k) -> torch.Tensor:
    """Each row's k most probable tokens, renormalised; the others get 0. top_k: int or one value per row."""
    probs = probs.float()
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    sorted_probs[ranks >= _per_row(top_k, len(probs), torch.long).view(-1, 1)] = 0.0
    return _renormalised(sorted_probs, order)


def top_p_renorm_prob(probs: torch.Tensor, top_p) -> torch.Tensor:
    """Each row's most probable tokens up to the first whose preceding mass exceeds top_p, renormalised."""
    probs = probs.float()
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs[mass_before > _per_row(top_p, len(probs), torch.float32).view(-1, 1)] = 0.0
    return _renormalised(sorted_probs, order)
