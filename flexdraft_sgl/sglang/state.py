"""What FLEXDRAFT hands SGLang's scheduler: the per-request state carried between iterations, and the verify input
of a target forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from sglang.srt.speculative.ngram_info import NgramVerifyInput
from sglang.srt.speculative.spec_info import SpecInput, SpecInputType


@dataclass
class FlexDraftState(SpecInput):
    """Carried as `batch.spec_info` between iterations: per request, the bonus token (decided, not yet in the KV
    cache) and the calibrated drafts that follow it. Filtered and merged with the batch."""

    bonus: torch.Tensor  # [bs] int64
    drafts: torch.Tensor  # [bs, B-1] int64
    draft_top: torch.Tensor  # [bs, B-1] top probability of each draft (verify-length rule)
    draft_probs: Optional[torch.Tensor] = None  # [bs, B-1, V] filtered draft distribution, when sampling

    # The scheduler's overlap relay reads these Eagle-shaped fields; FLEXDRAFT runs synchronously and has none.
    topk_p: ClassVar[Optional[torch.Tensor]] = None
    topk_index: ClassVar[Optional[torch.Tensor]] = None
    hidden_states: ClassVar[Optional[torch.Tensor]] = None
    future_indices: Optional[torch.Tensor] = None

    def __post_init__(self):
        super().__init__(SpecInputType.EAGLE_DRAFT)
        self.num_tokens_per_req = 1
        self.num_tokens_for_logprob_per_req = 1

    def _fields(self):
        return ("bonus", "drafts", "draft_top", "draft_probs")

    def filter_batch(self, new_indices: torch.Tensor, new_indices_cpu=None) -> None:
        for name in self._fields():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[new_indices])

    def merge_batch(self, other: FlexDraftState) -> None:
        for name in self._fields():
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is None and theirs is None:
                continue
            if mine is None or theirs is None:  # one side greedy: rebuild the missing distribution as one-hot
                vocab = (mine if mine is not None else theirs).shape[-1]
                mine = mine if mine is not None else one_hot(self.drafts, vocab, theirs.dtype)
                theirs = theirs if theirs is not None else one_hot(other.drafts, vocab, mine.dtype)
            setattr(self, name, torch.cat([mine, theirs]))


def one_hot(tokens: torch.Tensor, vocab: int, dtype) -> torch.Tensor:
    return torch.nn.functional.one_hot(tokens, vocab).to(dtype)


class FlexDraftVerifyInput(NgramVerifyInput):
    """A TARGET_VERIFY forward of `width` candidate rows per request under an explicit FULL_MASK. NGRAM's input
    already carries exactly that (draft tokens, positions, a FULL_MASK and a generic attention-argument builder), so
    FLEXDRAFT reuses it rather than copy it; the tree fields stay unset because FLEXDRAFT accepts on its own."""

    def __init__(self, draft_token: torch.Tensor, custom_mask: torch.Tensor, positions: torch.Tensor, width: int):
        super().__init__(draft_token=draft_token, custom_mask=custom_mask, positions=positions,
                         draft_token_num=width)
