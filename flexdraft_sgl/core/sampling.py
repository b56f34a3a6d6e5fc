"""Sampling filters and draws, applied identically to target and draft distributions.

Speculative sampling is lossless only if the draft distribution q and the target distribution p are filtered by the
same rule, so both go through `filtered_probs`. Temperature 0, or top_k 1 (how SGLang encodes greedy), means greedy:
the distribution becomes one-hot at the argmax, which turns the rejection rule of `acceptance.py` into exact greedy
matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    """Per-request settings, each a [bs] tensor. top_k <= 0 and top_p >= 1 switch the filter off."""

    temperature: Tensor
    top_k: Tensor
    top_p: Tensor

    @classmethod
    def make(cls, batch_size: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, device=None):
        full = lambda v, dt: torch.full((batch_size,), v, dtype=dt, device=device)  # noqa: E731
        return cls(full(temperature, torch.float32), full(top_k, torch.long), full(top_p, torch.float32))

    @property
    def all_greedy(self) -> bool:
        return bool((self.temperature <= 0).all())

    def select(self, index: Tensor) -> SamplingParams:
        return SamplingParams(self.temperature[index], self.top_k[index], self.top_p[index])


def greedy_rows(params: SamplingParams) -> Tensor:
    """[bs] bool: the requests decoded greedily, at temperature 0 or with top_k 1 (SGLang's encoding of greedy)."""
    return (params.temperature <= 0) | (params.top_k == 1)


def _top_k_filter(scaled: Tensor, k: Tensor) -> Tensor:
    """Each request's k largest logits (ties at the k-th kept), found by top-k selection rather than a sort of the
    vocabulary. scaled [n, ..., V], k [n] in 2..V-1."""
    shape = (len(k),) + (1,) * (scaled.dim() - 1)
    kth = scaled.topk(int(k.max()), dim=-1).values.gather(-1, (k - 1).view(shape).expand(*scaled.shape[:-1], 1))
    return scaled.masked_fill(scaled < kth, float("-inf"))


def _top_p_filter(scaled: Tensor, top_p: Tensor) -> Tensor:
    """The smallest prefix of each sorted distribution whose mass reaches top_p [n]; its last logit is the cut-off."""
    shape = (len(top_p),) + (1,) * (scaled.dim() - 1)
    sorted_scaled = scaled.sort(dim=-1, descending=True)[0]
    sorted_probs = torch.softmax(sorted_scaled, dim=-1)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    keep = (mass_before < top_p.view(shape)).sum(-1, keepdim=True).clamp(min=1)
    return scaled.masked_fill(scaled < sorted_scaled.gather(-1, keep - 1), float("-inf"))


def filtered_probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """Probabilities after temperature, top-k and top-p; one-hot at the argmax for greedy requests. logits:
    [bs, ..., V]; params broadcast over the middle dimensions. Computed in float32. Each filter runs on the requests
    that use it only: a batch mixing greedy (top_k 1) and sampling requests must not sort every row's vocabulary."""
    bs, vocab = logits.shape[0], logits.shape[-1]
    shape = (bs,) + (1,) * (logits.dim() - 1)
    greedy = greedy_rows(params)
    scaled = logits.float() / torch.where(params.temperature > 0, params.temperature, 1.0).view(shape)
    top_k = ((params.top_k > 1) & (params.top_k < vocab) & ~greedy).nonzero().squeeze(1)
    if len(top_k):
        scaled[top_k] = _top_k_filter(scaled[top_k], params.top_k[top_k])
    top_p = ((params.top_p < 1) & ~greedy).nonzero().squeeze(1)
    if len(top_p):
        scaled[top_p] = _top_p_filter(scaled[top_p], params.top_p[top_p])
    probs = torch.softmax(scaled, dim=-1)
    rows = greedy.nonzero().squeeze(1)
    if len(rows):
        argmax = logits[rows].argmax(-1, keepdim=True)
        probs[rows] = torch.zeros_like(probs[: len(rows)]).scatter_(-1, argmax, 1.0)
    return probs


def draw(logits: Tensor, params: SamplingParams, generator: torch.Generator | None, all_greedy: bool) -> Tensor:
    """A token from the target's logits: argmax for an all-greedy batch (no V-sized distribution), else a sample."""
    if all_greedy:
        return logits.argmax(-1)
    return sample(filtered_probs(logits, params), generator)


@dataclass
class CalibratedDrafts:
    """What a draft step reads from its calibrated draft logits (produced in one pass by
    `flexdraft_sgl.kernels.calibration.calibrate`)."""

    logits: Tensor | None  # [..., V] float32 calibrated draft logits (None when every row is greedy: unread)
    tokens: Tensor  # [...] int64 argmax of logits (lowest index on ties, like torch.argmax)
    top: Tensor  # [...] float32 max of softmax(logits) at temperature 1: the verify-length rule's confidence
    probs: Tensor | None  # [..., V] float32 softmax(logits / temperature) if temperatures were given, else None

    def select(self, index: Tensor) -> CalibratedDrafts:
        """These requests' drafts (index into the first dimension)."""
        pick = lambda x: None if x is None else x[index]  # noqa: E731
        return CalibratedDrafts(pick(self.logits), self.tokens[index], self.top[index], pick(self.probs))


def draw_drafts(drafts: CalibratedDrafts, params: SamplingParams, generator: torch.Generator | None,
                all_greedy: bool) -> tuple[Tensor, Tensor | None, Tensor]:
    """Draft tokens [bs, D] from calibrated drafts: (tokens, the filtered distribution they were drawn from, or None
    when all greedy, top probability of each row for the verify-length rule). The precomputed softmax serves when
    no request filters (top-k, top-p, greedy rows); otherwise the filters run on the logits, as for the target."""
    if all_greedy:
        return drafts.tokens, None, drafts.top
    vocab = drafts.logits.shape[-1]
    unfiltered = bool(((params.temperature > 0) & ((params.top_k <= 0) | (params.top_k >= vocab))
                       & (params.top_p >= 1)).all())
    probs = drafts.probs if drafts.probs is not None and unfiltered else filtered_probs(drafts.logits, params)
    return sample(probs, generator), probs, drafts.top


def draft_temperatures(params: SamplingParams, all_greedy: bool) -> Tensor | None:
    """Per-request temperatures for `calibrate` (None when all greedy: no distribution is needed); greedy rows get
    1, their distribution comes from the filters."""
    if all_greedy:
        return None
    return torch.where(params.temperature > 0, params.temperature, 1.0).float()[:, None]


def sample(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One draw per distribution over the last dimension, by inverting its CDF: one uniform per row and a binary
    search, where an exponential race needs a random number per vocabulary entry (about 2.5x dearer on the CPU).
    The CDF is summed in float64. A token of probability 0 adds exactly nothing to it, so it is never drawn, and a
    one-hot distribution always yields its argmax: greedy rows need no special case."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    total = cdf[..., -1:].contiguous()
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64, device=probs.device)
    index = torch.searchsorted(cdf, u * total, right=True)
    # u * total can round up to total itself; the last token of nonzero probability is the first to reach it.
    return torch.minimum(index, torch.searchsorted(cdf, total)).squeeze(-1)
