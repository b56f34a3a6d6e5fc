"""Acceptance math, sampling filters, verify-length rules and the flex policy interface, as pure functions."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from flexdraft_sgl.core.acceptance import greedy_verify, speculative_verify
from flexdraft_sgl.core.confidence import expected_tokens, measured_verify_len, verify_lengths
from flexdraft_sgl.core.policy import (AcceptanceTracker, ForwardCostTable, Mode, cost_table_shapes,
                                       deep_pass_weight, measure_cost_table, plain_tokens_per_second, plan_step,
                                       row_outcomes)
from flexdraft_sgl.core.sampling import SamplingParams, filtered_probs, sample

ALPHA = 1e-3  # significance of every distribution test; seeds are fixed, so each test is deterministic


def follows(draws: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value of integer draws against a distribution; tokens of probability 0 must never appear."""
    counts = torch.bincount(draws, minlength=len(probs)).double()
    support = probs > 0
    assert counts[~support].sum() == 0, "a token outside the distribution's support was drawn"
    if support.sum() == 1:
        return 1.0
    expected = probs[support].double() / probs[support].double().sum() * counts.sum()
    return chisquare(counts[support].numpy(), expected.numpy()).pvalue


def test_greedy_verify_counts_leading_matches_and_respects_verify_len():
    drafts = torch.tensor([[5, 6, 7], [5, 6, 7], [1, 2, 3], [5, 6, 7]])
    argmax = torch.tensor([[5, 6, 7, 8], [5, 9, 7, 8], [0, 2, 3, 4], [5, 6, 7, 8]])
    accepted, bonus = greedy_verify(drafts, argmax, torch.tensor([3, 3, 3, 2]))
    assert accepted.tolist() == [3, 1, 0, 2]
    assert bonus.tolist() == [8, 9, 0, 7]  # the argmax at the first mismatch, or after the last verified draft


def test_speculative_verify_with_one_hot_distributions_is_greedy():
    g = torch.Generator().manual_seed(0)
    V, D, bs = 11, 5, 64
    logits = torch.randn(bs, D + 1, V, generator=g)
    drafts = torch.where(torch.rand(bs, D, generator=g) < 0.7, logits[:, :-1].argmax(-1),
                         torch.randint(0, V, (bs, D), generator=g))
    verify = torch.randint(1, D + 1, (bs,), generator=g)
    greedy = SamplingParams.make(bs, temperature=0.0)
    p = filtered_probs(logits, greedy)
    q = torch.nn.functional.one_hot(drafts, V).float()
    a1, b1 = speculative_verify(drafts, q, p, verify, g)
    a2, b2 = greedy_verify(drafts, logits.argmax(-1), verify)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_filters_temperature_topk_topp():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    same = lambda **kw: filtered_probs(logits, SamplingParams.make(1, **kw))[0]  # noqa: E731
    torch.testing.assert_close(same(temperature=1.0), logits.exp()[0])
    torch.testing.assert_close(same(temperature=1.0, top_k=2), torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    # top_p 0.8: 0.5+0.2 < 0.8, so 0.15 is needed too
    torch.testing.assert_close(same(temperature=1.0, top_p=0.8), torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    assert same(temperature=0.0).tolist() == [1, 0, 0, 0, 0]
    sharp = same(temperature=0.5)
    assert sharp[0] > 0.5 and torch.isclose(sharp.sum(), torch.tensor(1.0))


def test_sample_draws_from_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.6, 0.3])
    assert follows(sample(probs.expand(40000, 4), torch.Generator().manual_seed(1)), probs) > ALPHA


def test_sample_never_draws_a_token_of_probability_zero():
    """Zero entries anywhere (the last ones included: the CDF's top can be reached by rounding), one-hot rows and
    draft-shaped [bs, D, V] input."""
    g = torch.Generator().manual_seed(2)
    probs = torch.softmax(torch.randn(64, 3, 50, generator=g), -1)
    probs[:, :, 40:] = 0
    probs[:, :, ::3] = 0
    probs[0, 0] = torch.nn.functional.one_hot(torch.tensor(7), 50).float()
    draws = torch.stack([sample(probs, g) for _ in range(200)])
    assert draws.shape == (200, 64, 3)
    assert probs.expand(200, -1, -1, -1).gather(-1, draws[..., None]).gt(0).all()
    assert (draws[:, 0, 0] == 7).all()


@pytest.mark.parametrize("filters", [dict(temperature=1.0), dict(temperature=0.7, top_k=5, top_p=0.9)])
def test_speculative_verify_emits_the_target_distribution(filters):
    """Exact check of the rule on one request shape: whatever q is, the first emitted token (the first draft if
    accepted, else the resampled bonus) follows p at position 0, and the second follows p given the first."""
    g = torch.Generator().manual_seed(7)
    V, D, N = 6, 2, 200000
    params = SamplingParams.make(N, **filters)
    target_logits = torch.randn(1, D + 1, V, generator=g) * 1.5
    draft_logits = torch.randn(1, D, V, generator=g) * 1.5  # deliberately unrelated to the target
    p = filtered_probs(target_logits.expand(N, -1, -1), params)
    q = filtered_probs(draft_logits.expand(N, -1, -1), params)
    drafts = sample(q, g)
    accepted, bonus = speculative_verify(drafts, q, p, torch.full((N,), D), g)
    first = torch.where(accepted >= 1, drafts[:, 0], bonus)
    assert follows(first, p[0, 0]) > ALPHA
    # Second token, where the first draft was accepted: drawn from p at position 1 (p does not depend on the
    # prefix in this synthetic setup, which is exactly what the rule must reproduce).
    second = torch.where(accepted >= 2, drafts[:, 1], bonus)[accepted >= 1]
    assert follows(second, p[0, 1]) > ALPHA


def test_the_distribution_check_catches_a_wrong_rule():
    """Negative control for the test above: accepting every draft emits q, and the same check must reject it."""
    g = torch.Generator().manual_seed(7)
    V, N = 6, 200000
    params = SamplingParams.make(N, temperature=1.0)
    p = filtered_probs((torch.randn(1, 2, V, generator=g) * 1.5).expand(N, -1, -1), params)
    q = filtered_probs((torch.randn(1, 1, V, generator=g) * 1.5).expand(N, -1, -1), params)
    drafts = sample(q, g)
    assert follows(drafts[:, 0], p[0, 0]) < ALPHA


def test_verify_length_rules():
    top = torch.tensor([[0.9, 0.5, 0.1, 0.9], [0.05, 0.9, 0.9, 0.9], [0.99, 0.99, 0.99, 0.99]])
    # cumulative products: [.9 .45 .045 .0405], [.05 .045 .0405 .036], [.99 .98 .97 .96]
    assert verify_lengths(top, "cumulative_product", 0.04).tolist() == [4, 3, 4]
    assert verify_lengths(top, "cumulative_product", 0.3).tolist() == [2, 1, 4]
    assert verify_lengths(top, "cumulative_product", 0.3, max_len=3).tolist() == [2, 1, 3]
    # min_confidence keeps the leading run of drafts each above the threshold; at least one
    assert verify_lengths(top, "min_confidence", 0.4).tolist() == [2, 1, 4]
    with pytest.raises(ValueError, match="unknown verify-length rule"):
        verify_lengths(top, "max", 0.1)
    torch.testing.assert_close(expected_tokens(top[:1], torch.tensor([2])), torch.tensor([1 + 0.9 + 0.45],
                               dtype=torch.float64))


def test_cost_table_interpolates_and_round_trips():
    table = ForwardCostTable((1, 10, 100), (1.0, 2.0, 11.0))
    assert table.seconds_for(1) == 1.0 and table.seconds_for(5.5) == 1.5 and table.seconds_for(200) == 21.0
    assert ForwardCostTable.from_json(table.to_json()) == table
    with pytest.raises(ValueError):
        ForwardCostTable((1, 1), (1.0, 2.0))


def test_cost_tables_are_timed_on_plain_and_verify_shaped_forwards():
    # fewer rows than the verify width: one-row requests (a plain step); more: requests of the full width
    assert cost_table_shapes((1, 2, 4, 8, 16, 24), 8) == [(1, 1), (2, 1), (4, 1), (1, 8), (2, 8), (3, 8)]
    assert cost_table_shapes((8, 9, 12), 6) == [(2, 6)]  # all three round to two 6-row requests
    now, prepared = [0.0], []

    def prepare(requests, width):  # a fake forward of R rows takes R seconds, 10% more every other call
        prepared.append((requests, width))
        calls = [0]

        def forward():
            calls[0] += 1
            rows = requests * width
            now[0] += 100.0 if calls[0] == 1 else rows * (1.1 if calls[0] % 2 else 1.0)  # the first: a warm-up
        return forward

    table = measure_cost_table(prepare, [(2, 1), (1, 8)], repeats=3, clock=lambda: now[0])
    assert prepared == [(2, 1), (1, 8)] and table.rows == (2, 8)
    assert table.seconds == pytest.approx((2.0, 8.0))  # the median of the three timed calls, the warm-up left out


def test_policy_goes_parallel_then_sequential_then_plain_as_the_batch_grows():
    # Flat up to 64 rows (weight loading dominates), then linear (arithmetic dominates): a GPU's shape.
    table = ForwardCostTable((1, 64, 1064), (1.0, 1.0, 11.0))
    kwargs = dict(block_size=16, tuned_depth=4, num_layers=32)
    decisions = {bs: plan_step(torch.full((bs, 15), 0.8), table, **kwargs) for bs in (1, 32, 256)}
    assert decisions[1].mode is Mode.PARALLEL and decisions[1].verify_lens.tolist() == [15]
    assert decisions[32].mode is Mode.SEQUENTIAL and 1 <= int(decisions[32].verify_lens.max()) < 15
    assert decisions[256].mode is Mode.PLAIN
    assert set(decisions[1].predicted) == {Mode.PLAIN, Mode.PARALLEL, Mode.SEQUENTIAL}
    assert plain_tokens_per_second(1064, table) == pytest.approx(1064 / 11.0)


def test_policy_falls_back_to_plain_decoding_when_drafts_do_not_pay():
    kwargs = dict(block_size=8, tuned_depth=4, num_layers=30)
    linear = ForwardCostTable((1, 2), (1.0, 2.0))
    plan = plan_step(torch.full((32, 7), 0.05), linear, **kwargs)  # hopeless drafts, compute-bound
    assert plan.mode is Mode.PLAIN and plan.verify_lens.tolist() == [0] * 32
    assert plan.tokens_per_second == pytest.approx(plain_tokens_per_second(32, linear))


@pytest.mark.parametrize("fused", [True, False])
def test_policy_is_never_predicted_slower_than_plain_and_verifies_less_as_rows_cost_more(fused):
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(block_size=8, tuned_depth=2, num_layers=24, fused_parallel=fused)
    for _ in range(200):
        bs = int(torch.randint(1, 129, (1,), generator=gen))
        knee = float(torch.randint(1, 512, (1,), generator=gen))
        cost = ForwardCostTable((1, int(knee), int(knee) + 1000), (1.0, 1.0, 1.0 + 1000 / knee))  # flat, then linear
        top = torch.rand(bs, 7, generator=gen) ** 0.3
        plan = plan_step(top, cost, **kwargs)
        assert plan.tokens_per_second >= plain_tokens_per_second(bs, cost) * (1 - 1e-9)
        assert plan.tokens_per_second == max(plan.predicted.values())
    # The same confident drafts: free rows verify all seven, costly rows fewer (or none).
    top = torch.full((64, 7), 0.9)
    free = plan_step(top, ForwardCostTable((1, 10**6), (1.0, 1.0)), **kwargs)
    costly = plan_step(top, ForwardCostTable((1, 2), (1.0, 2.0)), **kwargs)
    assert free.mode is Mode.PARALLEL and int(free.verify_lens.max()) == 7
    assert int(costly.verify_lens.max()) < 7


def test_policy_keeps_to_the_verify_tiers_it_is_given():
    top = torch.full((4, 7), 0.9)
    plan = plan_step(top, ForwardCostTable((1, 10**6), (1.0, 1.0)), block_size=8, tuned_depth=2, num_layers=24,
                     verify_caps=(1, 3, 5))
    assert plan.mode is Mode.PARALLEL and plan.verify_lens.tolist() == [5] * 4


def test_the_mask_block_pass_is_charged_its_lm_head():
    # A deep-only pass of N of L layers costs N/L of a full forward of its rows only if the head were free; with the
    # head a fifth of a step (SmolLM2-135M on a memory-bound CPU) it costs a fifth more of one.
    assert deep_pass_weight(4, 30) == pytest.approx(4 / 30)
    assert deep_pass_weight(4, 30, head_share=0.2) == pytest.approx(0.2 + 0.8 * 4 / 30)
    table = ForwardCostTable((1, 64, 1064), (1.0, 1.0, 11.0))
    kwargs = dict(block_size=8, tuned_depth=4, num_layers=30, fused_parallel=False)
    # A first draft right one step in five: worth a 2-row verify and a mask block while the head is free (1.2 tokens
    # for 1.13 plain steps), not once it is paid (1.31 plain steps).
    top = torch.tensor([[0.2] + [0.0] * 6])
    assert plan_step(top, table, **kwargs).mode is Mode.PARALLEL
    assert plan_step(top, table, head_share=0.2, **kwargs).mode is Mode.PLAIN


def test_head_share_of_a_target_is_its_lm_head_over_head_and_layers():
    from conftest import tiny_target

    from flexdraft_sgl.sglang.worker import head_share

    model = tiny_target("llama", vocab=32, layers=4)
    layers = sum(p.numel() for p in model.model.layers.parameters())
    assert head_share(model) == pytest.approx(32 * 64 / (32 * 64 + layers))


def test_measured_acceptance_corrects_overconfident_drafts():
    table = ForwardCostTable((1, 64, 1064), (1.0, 1.0, 11.0))
    kwargs = dict(block_size=8, tuned_depth=4, num_layers=30, fused_parallel=False)  # the SGLang worker's shape
    top = torch.full((1, 7), 0.9)  # confident drafts ...
    assert plan_step(top, table, **kwargs).mode is Mode.PARALLEL
    tracker = AcceptanceTracker(rows=7)
    assert tracker.scale == 1.0
    for step in range(30):  # ... of which hardly any is accepted
        tracker.observe(row_outcomes(torch.tensor([int(step % 10 == 0)]), top, 7), requests=1)
    assert tracker.scale < 0.05
    assert plan_step(top, table, acceptance_scale=tracker.scale, **kwargs).mode is Mode.PLAIN
    for _ in range(100):  # plain steps pull the correction back, so speculation is tried again
        tracker.idle()
    assert tracker.scale > 0.9
    assert plan_step(top, table, acceptance_scale=tracker.scale, **kwargs).mode is Mode.PARALLEL


def test_row_outcomes_count_what_each_row_reached_accepted_and_was_predicted():
    top = torch.tensor([[0.5, 0.5], [1.0, 0.2], [0.9, 0.9]])  # two drafts verified per request
    outcomes = row_outcomes(torch.tensor([0, 1, 2]), top, rows=4)
    accepted, reached, predicted = outcomes.tolist()
    assert accepted == [2, 1, 0, 0]  # row j accepted when more than j drafts were
    assert reached == [3, 2, 0, 0]  # row 0 always; row 1 after an accepted row 0; rows 2, 3 were not verified
    assert predicted == pytest.approx([0.5 + 1.0 + 0.9, 0.25 + 0.2 + 0.81, 0, 0])


def _verify_with(rates: torch.Tensor, verify_len: int, requests: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """Simulated verification: row j is accepted with probability rates[j] once the rows before it were."""
    hits = torch.rand(requests, len(rates), generator=gen) < rates
    accepted = torch.cumprod(hits.long(), 1).sum(1).clamp(max=verify_len)
    return accepted, torch.full((requests, verify_len), 0.95)  # confidence that grants every row


def test_measured_acceptance_caps_the_verify_length_explores_and_grows_back():
    """Drafts whose confidence grants all 7 rows, but whose rows are accepted 30%, 20%, 2%, ... given the rows
    before them: after an optimistic start the cap settles at 2 (0.3 * 0.2 >= 0.01 > 0.3 * 0.2 * 0.02), the row past
    it is tried again now and then, one row at a time, and when acceptance improves the cap grows back to 7."""
    gen = torch.Generator().manual_seed(0)
    tracker, rule = AcceptanceTracker(rows=7), ("cumulative_product", 0.01)
    cap = measured_verify_len(tracker.rates, *rule)
    assert cap == 7  # nothing measured: every row is explored
    poor = torch.tensor([0.3, 0.2, 0.02, 0.02, 0.02, 0.02, 0.02])
    caps = []
    for _ in range(300):  # read-backs of 16 steps at batch 8
        accepted, top = _verify_with(poor, cap, 128, gen)
        tracker.observe(row_outcomes(accepted, top, 7), requests=128)
        cap = measured_verify_len(tracker.rates, *rule, current=cap)
        caps.append(cap)
    settled = caps[20:]
    assert settled.count(2) / len(settled) > 0.8
    assert 2 < max(settled) < 7  # rows past the cap are explored again as their measurements age, one at a time
    assert sum(settled) / len(settled) < 2.3  # a step verifies about 2 drafts, not the 7 confidence grants
    good = torch.full((7,), 0.9)
    for _ in range(10):
        accepted, top = _verify_with(good, cap, 128, gen)
        tracker.observe(row_outcomes(accepted, top, 7), requests=128)
        cap = measured_verify_len(tracker.rates, *rule, current=cap)
    assert cap == 7
    # min_confidence reads each row's measured rate on its own
    assert measured_verify_len(torch.tensor([0.5, 0.2, 0.9]), "min_confidence", 0.3) == 1
