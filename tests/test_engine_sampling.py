"""Sampling losslessness of the reference engine: on a tiny-vocabulary target, the first three tokens generated with
speculative sampling follow the target's exact distribution (enumerated with Hugging Face forwards), with a good and
a deliberately poor draft, in both modes, with and without top-k/top-p. Chi-square tests at ALPHA with fixed seeds;
a negative control shows the same check rejects a wrong acceptance rule."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import random_adapter, tiny_target
from scipy.stats import chisquare

import flexdraft_sgl.reference.engine as engine_module
from flexdraft_sgl.core.sampling import SamplingParams, filtered_probs, sample
from flexdraft_sgl.reference import ReferenceEngine

ALPHA = 1e-3
VOCAB, PROMPT, N = 8, [1, 2, 3], 4000
FILTERS = {"t1": dict(temperature=1.0), "filtered": dict(temperature=0.8, top_k=5, top_p=0.9)}
DRAFT_VOCAB = [0, 2, 3, 6]  # half the vocabulary: the other tokens are never drafted


@functools.lru_cache(maxsize=None)
def _target():
    return tiny_target("llama", vocab=VOCAB, layers=3, seed=1, init=0.15)


@functools.lru_cache(maxsize=None)
@torch.no_grad()
def exact_joint(filters: str) -> torch.Tensor:
    """[V, V, V] probability of the first three generated tokens under the filtered target."""
    model = _target()
    params = SamplingParams.make(1, **FILTERS[filters])
    cond = lambda seq: filtered_probs(model(torch.tensor([seq])).logits[:, -1], params)[0].double()  # noqa: E731
    joint = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.float64)
    p1 = cond(PROMPT)
    for a in range(VOCAB):
        if p1[a] == 0:
            continue
        p2 = cond(PROMPT + [a])
        for b in range(VOCAB):
            if p2[b] > 0:
                joint[a, b] = p1[a] * p2[b] * cond(PROMPT + [a, b])
    return joint


def min_pvalue(samples: torch.Tensor, joint: torch.Tensor) -> float:
    """Chi-square over the joint of tokens 1-2 and the marginal of token 3; cells expected under 5 are pooled, and a
    sample outside the support fails outright."""
    pvalues = []
    for cells, probs in (
        (samples[:, 0] * VOCAB + samples[:, 1], joint.sum(2).flatten()),
        (samples[:, 2], joint.sum((0, 1))),
    ):
        counts = torch.bincount(cells, minlength=len(probs)).double()
        assert counts[probs == 0].sum() == 0, "generated a token sequence the target cannot produce"
        expected = probs * len(samples)
        big = expected >= 5
        obs = torch.cat([counts[big], counts[~big].sum()[None]])
        exp = torch.cat([expected[big], expected[~big].sum()[None]])
        keep = exp > 0
        obs, exp = obs[keep], exp[keep] / exp[keep].sum() * obs[keep].sum()
        pvalues.append(chisquare(obs.numpy(), exp.numpy()).pvalue)
    return min(pvalues)


def speculative_samples(mode: str, draft: str, filters: str, seed: int = 0, draft_vocab=None) -> torch.Tensor:
    model = _target()
    scale = {"good": 0.05, "poor": 3.0}[draft]  # poor: mask rows and calibration far from anything sensible
    adapter = random_adapter(model, tuned_depth=1, block_size=4, rank=8, seed=seed, scale=scale,
                             calibration_form="hidden" if draft_vocab else "logits", draft_vocab=draft_vocab)
    engine = ReferenceEngine(model, adapter)
    results = engine.generate([PROMPT] * N, max_new_tokens=3, mode=mode, verify_len=3, seed=seed,
                              sampling=SamplingParams.make(N, **FILTERS[filters]))
    assert all(len(r.tokens) == 3 for r in results)
    return torch.tensor([r.tokens for r in results]), results


@pytest.mark.parametrize("filters", list(FILTERS))
@pytest.mark.parametrize("draft", ["good", "poor"])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_speculative_sampling_preserves_the_target_distribution(mode, draft, filters):
    samples, results = speculative_samples(mode, draft, filters)
    assert min_pvalue(samples, exact_joint(filters)) > ALPHA
    # the test only means something if drafts were both accepted and rejected along the way
    hist = [sum(r.stats.accepted_hist[a] if a < len(r.stats.accepted_hist) else 0 for r in results) for a in range(4)]
    assert hist[0] > 0 and sum(hist[1:]) > 0, hist


@pytest.mark.parametrize("filters", list(FILTERS))
def test_drafts_from_a_draft_vocabulary_preserve_the_target_distribution(filters):
    """Draft probability 0 outside the draft vocabulary: those tokens come only from the residual."""
    samples, results = speculative_samples("parallel", "good", filters, draft_vocab=DRAFT_VOCAB)
    assert min_pvalue(samples, exact_joint(filters)) > ALPHA
    hist = [sum(r.stats.accepted_hist[a] if a < len(r.stats.accepted_hist) else 0 for r in results) for a in range(4)]
    assert hist[0] > 0 and sum(hist[1:]) > 0, hist


def test_plain_sampling_on_the_same_path_passes_too():
    engine = ReferenceEngine(_target())
    results = engine.generate([PROMPT] * N, max_new_tokens=3, mode="plain", seed=3,
                              sampling=SamplingParams.make(N, temperature=1.0))
    assert min_pvalue(torch.tensor([r.tokens for r in results]), exact_joint("t1")) > ALPHA


def test_the_check_rejects_a_wrong_acceptance_rule(monkeypatch):
    """Negative control: accept every draft (emitting the draft distribution) and the same check must fail."""

    def accept_all(drafts, draft_probs, target_probs, verify_lens, generator=None):
        rows = torch.arange(len(drafts))
        return verify_lens, sample(target_probs[rows, verify_lens], generator)

    monkeypatch.setattr(engine_module, "speculative_verify", accept_all)
    samples, _ = speculative_samples("parallel", "poor", "t1")
    assert min_pvalue(samples, exact_joint("t1")) < ALPHA


def test_exact_joint_is_a_distribution():
    for name in FILTERS:
        assert torch.isclose(exact_joint(name).sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (exact_joint("filtered") == 0).sum() > (exact_joint("t1") == 0).sum()
