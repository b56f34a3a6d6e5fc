"""Greedy losslessness of the reference engine: its output equals Hugging Face greedy generation token for token
(float32), whatever the drafts are, in every mode, block size and verify length, for batches of ragged prompts."""

from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch
from conftest import ARCHS, hf_greedy, random_adapter, random_prompts, tiny_target

from flexdraft_sgl.core.layout import parallel_layout, prefill_layout
from flexdraft_sgl.reference import ReferenceEngine

MAX_NEW = 24
SETTINGS = [  # (block size, verify length; None = the adapter's confidence rule)
    (2, None),
    (4, 3),
    (8, None),
    (8, 5),
]


@functools.lru_cache(maxsize=None)
def _tiny(arch):
    model = tiny_target(arch, vocab=32)
    prompts = random_prompts(6, 32, seed=11, max_len=14)
    return model, prompts, [hf_greedy(model, p, MAX_NEW) for p in prompts]


@pytest.mark.parametrize("block_size, verify_len", SETTINGS)
@pytest.mark.parametrize("mode", ["parallel", "sequential", "flex"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_hf_generate(arch, mode, block_size, verify_len):
    model, prompts, expected = _tiny(arch)
    adapter = random_adapter(model, tuned_depth=2, block_size=block_size, seed=block_size)
    results = ReferenceEngine(model, adapter).generate(prompts, max_new_tokens=MAX_NEW, mode=mode,
                                                       verify_len=verify_len)
    for res, exp in zip(results, expected):
        assert res.tokens == exp
        assert res.finish_reason == "length"


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_a_draft_vocabulary_drafts_only_its_tokens_and_stays_lossless(mode):
    model, prompts, expected = _tiny("llama")
    # Half the vocabulary, chosen as training does (the most frequent answer tokens); the answers still leave it.
    ids = sorted(t for t, _ in Counter(t for answer in expected for t in answer).most_common(16))
    adapter = random_adapter(model, tuned_depth=2, block_size=4, scale=0.05, calibration_form="hidden",
                             draft_vocab=ids)
    engine = ReferenceEngine(model, adapter)
    hidden, bonus = torch.randn(3, 3, model.config.hidden_size), torch.tensor([1, 2, 3])
    drafts = engine.calibrated_drafts(hidden, bonus, torch.ones(3, 1))
    assert set(drafts.tokens.flatten().tolist()) <= set(ids)
    outside = torch.ones(32, dtype=torch.bool)
    outside[ids] = False
    assert (drafts.probs[..., outside] == 0).all() and torch.allclose(drafts.probs.sum(-1), torch.ones(3, 3))
    results = engine.generate(prompts, max_new_tokens=MAX_NEW, mode=mode, verify_len=3)
    assert [r.tokens for r in results] == expected
    assert sum(a > 0 for r in results for a in r.stats.accepted_trace) > 0  # some drafts were accepted


@pytest.mark.parametrize("arch", ARCHS)
def test_plain_mode_is_the_same_code_path_and_exact(arch):
    model, prompts, expected = _tiny(arch)
    results = ReferenceEngine(model).generate(prompts, max_new_tokens=MAX_NEW, mode="plain")
    assert [r.tokens for r in results] == expected
    assert all(r.stats.forwards == MAX_NEW and r.stats.tau == 1.0 for r in results)


def _boundaries(stats):
    """Yield (first emitted index, accepted drafts) per forward, from the accepted trace."""
    at = 0
    for a in stats.accepted_trace:
        yield at, a
        at += max(a, 0) + 1


def _accepted_positions(result):
    """Indices of output tokens that were accepted drafts (not a bonus or an exact token)."""
    return {start + i for start, a in _boundaries(result.stats) for i in range(max(a, 0))}


@functools.lru_cache(maxsize=None)
def _small_vocab_run(mode):
    """A 16-token vocabulary makes random drafts match often enough to land inside accepted blocks."""
    model = tiny_target("llama", vocab=16, seed=3)
    adapter = random_adapter(model, tuned_depth=2, block_size=6, seed=5)
    prompts = random_prompts(24, 16, seed=4, max_len=10)
    engine = ReferenceEngine(model, adapter)
    return model, engine, prompts, engine.generate(prompts, max_new_tokens=40, mode=mode, verify_len=5)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_eos_inside_an_accepted_block(mode):
    model, engine, prompts, results = _small_vocab_run(mode)
    cases = []
    for prompt, res in zip(prompts, results):
        accepted = _accepted_positions(res)
        for pos in sorted(accepted):
            token = res.tokens[pos]
            if res.tokens.index(token) == pos and pos + 1 < len(res.tokens):
                cases.append((prompt, token, pos))
                break
    assert len(cases) >= 3, "the fixed seed no longer yields accepted drafts to put an EOS in"
    for prompt, eos, pos in cases:
        res = engine.generate([prompt], max_new_tokens=40, mode=mode, verify_len=5, stop_token_ids=[eos])[0]
        assert res.tokens == hf_greedy(model, prompt, 40, eos=eos)
        assert res.tokens[-1] == eos and len(res.tokens) == pos + 1 and res.finish_reason == "stop"
        assert pos in _accepted_positions(res), "the EOS was not an accepted draft this time"


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_max_new_tokens_inside_an_accepted_block(mode):
    model, engine, prompts, results = _small_vocab_run(mode)
    checked = 0
    for prompt, res in zip(prompts, results):
        inner = [p for p in sorted(_accepted_positions(res)) if p + 1 < len(res.tokens)]
        if not inner:
            continue
        limit = inner[0] + 1  # stop right after an accepted draft, before the rest of its block
        out = engine.generate([prompt], max_new_tokens=limit, mode=mode, verify_len=5)[0]
        assert out.tokens == res.tokens[:limit] == hf_greedy(model, prompt, limit)
        assert out.finish_reason == "length" and len(out.tokens) == limit
        checked += 1
    assert checked >= 3


def test_batch_members_finish_independently():
    model, engine, prompts, results = _small_vocab_run("parallel")
    stops = [res.tokens[5] for res in results[:6]]
    batch = engine.generate(prompts[:6], max_new_tokens=40, mode="parallel", verify_len=5, stop_token_ids=stops[:1])
    for prompt, out in zip(prompts[:6], batch):
        assert out.tokens == hf_greedy(model, prompt, 40, eos=stops[0])


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@torch.no_grad()
def test_mask_rows_never_change_candidate_rows_or_the_cache(arch):
    """The lossless invariant at the level of one forward: two adapters that differ everywhere give bit-identical
    candidate hidden states and KV cache; a forward with no mask rows at all gives the same up to float rounding
    (its matrices have other shapes); only mask-row outputs differ."""
    model = tiny_target(arch, vocab=32)
    prompts = random_prompts(3, 32, seed=2)
    lens = [len(p) for p in prompts]
    outs = []
    for seed, with_blocks in ((1, True), (2, True), (1, False)):
        engine = ReferenceEngine(model, random_adapter(model, block_size=4, seed=seed))
        cache = engine.new_cache(3, 64)
        engine.forward(prefill_layout(lens, 4, with_block=with_blocks), torch.tensor(sum(prompts, [])), cache)
        step = parallel_layout(lens, [3, 1, 2], 4)
        step = step if with_blocks else step.candidates_only()
        tokens = torch.randint(0, 32, (int(step.num_candidates.sum()),), generator=torch.Generator().manual_seed(0))
        hidden = engine.forward(step, tokens, cache)
        outs.append((hidden[step.candidate_rows], hidden[step.mask_rows], cache))
    (c1, m1, k1), (c2, m2, k2), (c0, _, k0) = outs
    assert torch.equal(c1, c2)
    torch.testing.assert_close(c0, c1, rtol=1e-5, atol=1e-4)
    for a, b, c in zip(k1.k + k1.v, k2.k + k2.v, k0.k + k0.v):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(m1, m2)


def test_bad_arguments_are_refused():
    model = tiny_target("llama")
    engine = ReferenceEngine(model)
    with pytest.raises(ValueError, match="needs an adapter"):
        engine.generate([[1, 2]], mode="parallel")
    with pytest.raises(ValueError, match="unknown mode"):
        engine.generate([[1, 2]], mode="tree")
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[]], mode="plain")
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[1]], mode="plain", max_new_tokens=0)


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("tuned_depth, block_size", [(2, 4), (4, 8)])
def test_smollm2_with_a_random_adapter_is_lossless(smollm2, mode, tuned_depth, block_size):
    model, tokenizer = smollm2
    questions = ["What is the capital of France?", "Write a haiku about the sea.",
                 "List three prime numbers and explain why each is prime.", "Hi"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in questions]
    assert len({len(p) for p in prompts}) == len(prompts)
    adapter = random_adapter(model, tuned_depth=tuned_depth, block_size=block_size, rank=32, scale=0.02,
                             tokenizer=tokenizer)
    engine = ReferenceEngine(model, adapter, tokenizer)
    results = engine.generate(prompts, max_new_tokens=20, mode=mode, stop_token_ids=[tokenizer.eos_token_id],
                              verify_len=block_size - 1)
    for prompt, res in zip(prompts, results):
        assert res.tokens == hf_greedy(model, prompt, 20, eos=tokenizer.eos_token_id)
    assert results[0].finish_reason == "stop"  # "The capital of France is Paris." ends well inside 20 tokens
