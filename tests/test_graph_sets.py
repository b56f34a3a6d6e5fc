"""The CUDA-graph-set bookkeeping of the SGLang worker (flexdraft_sgl/sglang/graphs.py) and the hook that gives SGLang's
verify-graph warm-up a FLEXDRAFT input. Capturing itself needs a GPU: scripts/gpu_check.py does that."""

from __future__ import annotations

import pytest
import torch

from flexdraft_sgl.sglang.graphs import (
    GraphSets, batch_bucket, plan_sets, set_bytes, tier_for, verify_tiers, widths_for_mode,
)


def test_verify_tiers_cover_every_length_at_most_twice_over():
    assert verify_tiers(1) == (1,)
    assert verify_tiers(5) == (1, 3, 5)
    assert verify_tiers(7) == (1, 3, 7)
    assert verify_tiers(15) == (1, 3, 7, 15)
    for top in range(1, 40):
        tiers = verify_tiers(top)
        assert tiers[-1] == top and list(tiers) == sorted(set(tiers))
        for v in range(1, top + 1):
            t = tier_for(v, tiers)
            assert v <= t <= max(2 * v + 1, 1) and t in tiers
    with pytest.raises(ValueError):
        tier_for(8, verify_tiers(7))
    with pytest.raises(ValueError):
        verify_tiers(0)


def test_each_mode_gets_the_widths_it_runs():
    tiers = verify_tiers(7)
    assert widths_for_mode("parallel", tiers) == (2, 4, 8)
    assert widths_for_mode("sequential", tiers) == (1, 2, 4, 8)  # + the bonus forward
    assert widths_for_mode("flex", tiers) == (1, 2, 4, 8)  # + plain steps


def test_batches_pad_to_the_next_captured_size_or_run_eagerly():
    captured = [1, 2, 4, 8, 16, 24, 32]
    assert [batch_bucket(b, captured) for b in (1, 3, 8, 17, 32)] == [1, 4, 8, 24, 32]
    assert batch_bucket(33, captured) is None


def test_graph_sets_are_planned_within_the_free_memory_narrowest_first():
    """An H200-like case: context 131072, SGLang's buckets up to 256, flashinfer's 5 bytes per verify row and context
    position (width 8 at batch 256 alone: 1.25 GiB). With 1 GiB to spend, widths 1 and 2 keep every bucket, width 4
    loses batch 256 and width 8 is captured up to batch 32 (larger batches of it run eagerly)."""
    buckets = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    context, gib = 131072, 1 << 30
    assert set_bytes(256, 8, context, "flashinfer") == 1.25 * gib
    assert plan_sets((8, 4, 2, 1), buckets, context, "flashinfer", 100 * gib) == dict.fromkeys((1, 2, 4, 8), buckets)
    plan = plan_sets((1, 2, 4, 8), buckets, context, "flashinfer", gib)
    assert plan == {1: buckets, 2: buckets, 4: buckets[:-1], 8: buckets[:6]}
    assert sum(set_bytes(max(b), w, context, "flashinfer") for w, b in plan.items()) <= gib
    assert plan_sets((2,), buckets, context, "triton", 0) == {2: ()}  # nothing fits: that width runs eagerly


class _Runner:
    """The two attributes of SGLang's ModelRunner that a graph set swaps."""

    def __init__(self):
        self.attn_backend, self.decode_cuda_graph_runner = "startup-backend", "startup-graphs"


def test_activating_a_set_swaps_backend_and_graphs_and_refuses_unknown_widths():
    runner = _Runner()
    sets = GraphSets(runner)
    sets.register_startup(8)
    sets.sets[2] = type(sets.sets[8])(2, "backend-2", "graphs-2")
    sets.activate(2)
    assert (runner.attn_backend, runner.decode_cuda_graph_runner, sets.active) == ("backend-2", "graphs-2", 2)
    sets.activate(8)
    assert (runner.attn_backend, runner.decode_cuda_graph_runner) == ("startup-backend", "startup-graphs")
    with pytest.raises(KeyError, match="width 3"):
        sets.activate(3)


def test_graph_warmup_gets_a_flexdraft_verify_input_and_other_algorithms_are_untouched():
    from sglang.srt.plugins.hook_registry import HookRegistry

    from flexdraft_sgl.sglang.plugin import register

    register()
    HookRegistry.apply_hooks()
    from sglang.srt.model_executor.runner import base_runner
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    from flexdraft_sgl.sglang.state import FlexDraftVerifyInput

    mask = torch.ones(64, dtype=torch.bool)
    dummy = base_runner.create_dummy_verify_input(SpeculativeAlgorithm.from_string("FLEXDRAFT"), mask, 4, False)
    assert isinstance(dummy, FlexDraftVerifyInput)
    # no mask: capture and replay both take the backends' causal verify path
    assert dummy.custom_mask is None and dummy.num_tokens_per_req == 4 and dummy.draft_token_num == 4
    # NGRAM goes on to SGLang's own function, which reads the server's published spec config (none outside a server)
    with pytest.raises(ValueError, match="not published"):
        base_runner.create_dummy_verify_input(SpeculativeAlgorithm.from_string("NGRAM"), mask, 4, False)
