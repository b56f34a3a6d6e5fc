"""What FLEXDRAFT hands SGLang's scheduler: the per-request state carried between iterations, and the verify input
of a target forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from sglang.srt.speculative.dflash_info import DFlashVerifyInput
from sglang.srt.speculative.spec_info import SpecInput, SpecInputType


@dataclass
class FlexDraftState(SpecInput):
    """Carried as `batch.spec_info` between iterations: per request, the bonus token (decided, not yet in the KV
    cache) and the calibrated drafts that follow it; for sampling requests only, the distribution each draft was
    drawn from (greedy requests verify by argmax, and a [B-1, V] float32 distribution each would be held for
    nothing). Filtered and merged with the batch."""

    bonus: torch.Tensor  # [bs] int64
    drafts: torch.Tensor  # [bs, B-1] int64
    draft_top: torch.Tensor  # [bs, B-1] top probability of each draft (verify-length rule)
    sampled: Optional[torch.Tensor] = None  # [bs] bool, the sampling requests; None when every request is greedy
    draft_probs: Optional[torch.Tensor] = None  # [sampling requests, B-1, V] their filtered draft distributions

    # The scheduler's overlap relay reads these Eagle-shaped fields; FLEXDRAFT runs synchronously and has none.
    topk_p: ClassVar[Optional[torch.Tensor]] = None
    topk_index: ClassVar[Optional[torch.Tensor]] = None
    hidden_states: ClassVar[Optional[torch.Tensor]] = None
    future_indices: Optional[torch.Tensor] = None

    def __post_init__(self):
        super().__init__(SpecInputType.EAGLE_DRAFT)
        self.num_tokens_per_req = 1
        self.num_tokens_for_logprob_per_req = 1

    def filter_batch(self, new_indices: torch.Tensor, new_indices_cpu=None) -> None:
        if self.sampled is not None:
            kept = self.sampled[new_indices]
            self.draft_probs = self.draft_probs[_probs_row(self.sampled)[new_indices][kept]]
            self.sampled = kept
        self.bonus, self.drafts, self.draft_top = (x[new_indices] for x in (self.bonus, self.drafts, self.draft_top))

    def merge_batch(self, other: FlexDraftState) -> None:
        if self.sampled is not None or other.sampled is not None:
            self.sampled = torch.cat([_sampled_mask(self), _sampled_mask(other)])
            self.draft_probs = torch.cat([p for p in (self.draft_probs, other.draft_probs) if p is not None])
        self.bonus, self.drafts, self.draft_top = (torch.cat([mine, theirs]) for mine, theirs in (
            (self.bonus, other.bonus), (self.drafts, other.drafts), (self.draft_top, other.draft_top)))


def _probs_row(sampled: torch.Tensor) -> torch.Tensor:
    """[bs] the row of each sampling request's distribution in `draft_probs` (meaningless for greedy ones)."""
    return torch.cumsum(sampled.long(), 0) - 1


def _sampled_mask(state: FlexDraftState) -> torch.Tensor:
    """[bs] bool: which requests sample (all False for an all-greedy state)."""
    return state.sampled if state.sampled is not None else torch.zeros_like(state.bonus, dtype=torch.bool)


class FlexDraftVerifyInput(SpecInput):
    """A TARGET_VERIFY forward of `width` candidate rows per request. The rows form a causal chain after the request's
    cached prefix (`core.masks.full_mask` of a verify layout), which every backend FLEXDRAFT accepts applies on its
    own when no custom mask is given, as for SGLang's DFLASH verify (speculative/dflash_worker_v2.py: "TARGET_VERIFY
    uses standard causal masking; custom masks are unnecessary here"): flashinfer runs its paged prefill with
    causal=True (layers/attention/flashinfer_backend.py `forward_extend`), triton its causal extend kernel, and
    `patches/torch_native_verify` a causal chain. So no mask is built, sent or packed. The fields are NGRAM's verify
    input's (NGRAM_VERIFY: the backends' generic verify path); the CSR attention arguments come from DFLASH's
    builder, which is NGRAM's for a uniform width without the mask NGRAM's assumes."""

    generate_attn_arg_prefill = DFlashVerifyInput.generate_attn_arg_prefill

    def __init__(self, draft_token: torch.Tensor | None, positions: torch.Tensor | None, width: int):
        super().__init__(SpecInputType.NGRAM_VERIFY)
        self.draft_token, self.positions, self.draft_token_num = draft_token, positions, width
        self.num_tokens_per_req = self.num_tokens_for_logprob_per_req = width
