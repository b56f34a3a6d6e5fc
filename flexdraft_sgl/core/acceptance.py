"""Verification: how many drafts each request accepts, and the bonus token that follows them.

Shapes: `D` is the longest verify length in the batch; request i verifies its first `verify_lens[i]` drafts and
ignores the rest. `draft_tokens[i, j]` is draft d(j+1); the target distribution at candidate c_j (row j of the
candidate block, c_0 = the previous bonus) predicts the token after c_j, so `target_*[i, j]` judges draft j.

Both rules return (accepted [bs] in 0..verify_len, bonus [bs]); a request emits its `accepted` drafts, then the bonus.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sampling import sample


def _valid(verify_lens: Tensor, width: int) -> Tensor:
    return torch.arange(width, device=verify_lens.device)[None, :] < verify_lens[:, None]


def _leading_true(ok: Tensor) -> Tensor:
    return torch.cumprod(ok.to(torch.long), dim=1).sum(1)


def greedy_verify(draft_tokens: Tensor, target_argmax: Tensor, verify_lens: Tensor) -> tuple[Tensor, Tensor]:
    """Accept drafts while they equal the target's argmax; the bonus is the argmax at the first mismatch (or after
    the last verified draft). target_argmax: [bs, D+1]."""
    ok = (draft_tokens == target_argmax[:, :-1]) & _valid(verify_lens, draft_tokens.shape[1])
    accepted = _leading_true(ok)
    return accepted, target_argmax.gather(1, accepted[:, None]).squeeze(1)


def speculative_verify(
    draft_tokens: Tensor,
    draft_probs: Tensor,
    target_probs: Tensor,
    verify_lens: Tensor,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    draft_probs [bs, D, V]: the filtered draft distribution each draft was drawn from (q); target_probs
    [bs, D+1, V]: the filtered target distribution (p). Draft j is accepted with probability min(1, p(d)/q(d)); at
    the first rejection the bonus is drawn from normalize(max(0, p - q)); if every verified draft passes, from p.
    The output distribution is exactly p's, whatever q is. With one-hot p and q (temperature 0) this is
    `greedy_verify`.
    """
    bs, width = draft_tokens.shape
    rows = torch.arange(bs, device=draft_tokens.device)
    index = draft_tokens[:, :, None]
    p_d = target_probs[:, :width].gather(2, index).squeeze(2)
    q_d = draft_probs.gather(2, index).squeeze(2)
    u = torch.rand((bs, width), generator=generator, device=draft_tokens.device)
    # u < p/q without dividing by q; strict so that p(d) = 0 always rejects.
    ok = (u * q_d < p_d) & _valid(verify_lens, width)
    accepted = _leading_true(ok)

    p_a = target_probs[rows, accepted]
    q_a = torch.cat([draft_probs, draft_probs.new_zeros(bs, 1, draft_probs.shape[2])], 1)[rows, accepted]
    residual = (p_a - q_a).clamp_(min=0)
    mass = residual.sum(-1, keepdim=True)
    rejected = (accepted < verify_lens)[:, None]
    # p == q exactly leaves no residual mass, but then rejection had probability 0: fall back to p.
    resample = torch.where(rejected & (mass > 0), residual / mass.clamp(min=1e-30), p_a)
    return accepted, sample(resample, generator)
