"""How many drafts to verify, from the calibrated drafts' own confidence.

`top_probs[i, j]` is the top probability of request i's calibrated draft j+1. Both rules keep a leading run of
drafts, at least one and at most `max_len`:
  cumulative_product   keep draft j while q_1 * ... * q_j >= threshold   (the release's rule, threshold 0.01)
  min_confidence       keep draft j while every q_1 .. q_j >= threshold
The same rule over the rows' measured acceptance caps what it grants (`measured_verify_len`): confidence can
overstate acceptance.
"""

from __future__ import annotations

import torch
from torch import Tensor

RULES = ("cumulative_product", "min_confidence")


def verify_lengths(top_probs: Tensor, rule: str = "cumulative_product", threshold: float = 0.01,
                   max_len: int | None = None) -> Tensor:
    if rule == "cumulative_product":
        keep = torch.cumprod(top_probs.double(), dim=1) >= threshold
    elif rule == "min_confidence":
        keep = top_probs >= threshold
    else:
        raise ValueError(f"unknown verify-length rule {rule!r}; choose one of {', '.join(RULES)}")
    leading = torch.cumprod(keep.to(torch.long), dim=1).sum(1)
    upper = top_probs.shape[1] if max_len is None else min(max_len, top_probs.shape[1])
    return leading.clamp(min=1, max=upper)


def expected_tokens(top_probs: Tensor, verify_lens: Tensor) -> Tensor:
    """Expected tokens a verify of `verify_lens` drafts emits, reading each q_j as the chance draft j survives:
    1 (the bonus) + sum_{j <= v} q_1 * ... * q_j."""
    survive = torch.cumprod(top_probs.double(), dim=1)
    valid = torch.arange(top_probs.shape[1], device=top_probs.device)[None, :] < verify_lens[:, None]
    return 1.0 + (survive * valid).sum(1)


def measured_verify_len(row_rates: Tensor, rule: str = "cumulative_product", threshold: float = 0.01,
                        current: int | None = None) -> int:
    """The verify length measured acceptance supports: the confidence rule applied to each row's measured acceptance
    given the rows before it were accepted (`policy.AcceptanceTracker.rates`) instead of a draft's confidence; at
    least 1. Under cumulative_product, row j is verified only while the measured chance that rows 1..j are all
    accepted stays >= threshold, so rows that are almost never accepted are not verified, whatever the drafts'
    confidence claims. From a `current` cap it grows by one row at most: rows past the cap read optimistically
    (unmeasured), and exploring them one at a time keeps a row that fails from taking all the rows after it along."""
    cap = int(verify_lengths(row_rates[None], rule, threshold)[0])
    return cap if current is None else min(cap, current + 1)
