"""The CUDA-graph-set bookkeeping of the SGLang worker (flexdraft_sgl/sglang/graphs.py) and the hook that gives SGLang's
verify-graph warm-up a FLEXDRAFT input. Capturing itself needs a GPU: scripts/gpu_check.py does that."""

from __future__ import annotations

import pytest
import torch

from flexdraft_sgl.sglang.graphs import GraphSets, batch_bucket, tier_for, verify_tiers, widths_for_mode


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
    assert dummy.custom_mask is mask and dummy.num_tokens_per_req == 4 and dummy.draft_token_num == 4
    # NGRAM goes on to SGLang's own function, which reads the server's published spec config (none outside a server)
    with pytest.raises(ValueError, match="not published"):
        base_runner.create_dummy_verify_input(SpeculativeAlgorithm.from_string("NGRAM"), mask, 4, False)
