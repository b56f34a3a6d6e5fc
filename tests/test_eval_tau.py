"""`flexdraft eval-tau`: replaying greedy decoding over the target's own answers gives exactly the accepted lengths
that decoding gives, for both modes and both verify lengths; variants change only what they name; work is cached."""

from __future__ import annotations

import pytest
import torch
from conftest import random_adapter, random_prompts, tiny_target

from flexdraft_sgl.eval import datasets as eval_datasets
from flexdraft_sgl.eval import tau as tau_eval
from flexdraft_sgl.eval.tau import (AnswerDrafts, TauEval, adapter_variant, answer_drafts, markdown_table,
                                   reliability, reliability_table, row_acceptance, row_table, walk)
from flexdraft_sgl.reference import ReferenceEngine


class IdTokenizer:
    """Prompts are already token ids, written as text: "3 1 4"."""

    chat_template = None
    eos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True):
        return {"input_ids": [int(t) for t in text.split()]}

    def get_vocab(self):
        return {str(i): i for i in range(16)}


def test_variants_change_only_what_they_name():
    adapter = random_adapter(tiny_target("llama"), block_size=4)
    off = adapter_variant(adapter, 3, calibration=False)
    assert off.config.block_size == 3 and adapter.config.block_size == 4
    H = adapter.config.target.hidden_size
    with torch.no_grad():
        assert float(off.calibration(torch.randn(2, H), torch.randn(2, H)).abs().max()) == 0.0
    assert torch.equal(off.mask_embedding, adapter.mask_embedding[:3])
    assert adapter.calibration.down.weight.abs().sum() > 0  # the original is untouched


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_the_replay_equals_decoding_step_for_step(arch, mode):
    # a 16-token vocabulary and a random adapter: drafts are accepted often, at every length
    model = tiny_target(arch, vocab=16, seed=3)
    adapter = random_adapter(model, block_size=5, seed=5)
    engine = ReferenceEngine(model, adapter)
    prompts = random_prompts(6, 16, seed=4, max_len=10)
    plain = [r.tokens for r in ReferenceEngine(model).generate(prompts, max_new_tokens=30, mode="plain")]
    accepted = []
    for verify_len in (None, 4):  # the confidence rule, and all B-1 drafts
        decoded = engine.generate(prompts, max_new_tokens=30, mode=mode, verify_len=verify_len)
        for prompt, answer, result in zip(prompts, plain, decoded):
            drafts, _ = answer_drafts(engine, prompt, answer)
            cfg = adapter.config
            v = (torch.full((len(drafts.top),), 4) if verify_len else
                 tau_eval.verify_lengths(drafts.top, cfg.verify_rule, cfg.verify_threshold, max_len=4))
            assert result.tokens == answer
            trace = [a for a in result.stats.accepted_trace if a >= 0]
            assert walk(drafts, len(answer), mode, v) == trace
            accepted += trace
    assert sum(a > 0 for a in accepted) >= 5  # the comparison saw real acceptance


def test_row_acceptance_counts_only_states_that_reached_the_row_inside_the_answer():
    # Answer of 5 tokens: states P = 0..3, three draft rows; state P's row j drafts answer[P + j], so row j has
    # 4 - j + 1 states inside the answer (rows past the end count neither way).
    matches = torch.tensor([[1, 1, 0],
                            [1, 0, 1],
                            [0, 1, 1],   # row 1 rejected: rows 2, 3 never reached
                            [1, 0, 0]],  # rows 2, 3 of the last state lie past the answer
                           dtype=torch.bool)
    d = AnswerDrafts(matches=matches, top=torch.ones(4, 3))
    # row 1: 3 of 4 states accepted; row 2: reached by P = 0, 1 (P = 2 rejected row 1, P = 3 lies past the answer),
    # accepted by P = 0; row 3: reached only by P = 0 (inside: 0 + 3 <= 4), rejected.
    assert row_acceptance([d]) == pytest.approx([3 / 4, 1 / 2, 0.0])
    # A second answer pools states with the first, and a row nobody reaches is NaN.
    short = AnswerDrafts(matches=torch.tensor([[False, True, True]]), top=torch.ones(1, 3))
    rates = row_acceptance([d, short])
    assert rates[:2] == pytest.approx([3 / 5, 1 / 2]) and rates[2] == 0.0
    assert torch.isnan(torch.tensor(row_acceptance([short])[1]))
    table = row_table([{"dataset": "x", "block_size": 4, "calibration": True, "row_acceptance": [0.75, 0.5, 0.0]}])
    assert "| x | 4 | on | 0.750 | 0.500 | 0.000 |" in table


def test_reliability_bins_confidence_against_acceptance_over_the_states_reaching_each_row():
    matches = torch.tensor([[1, 1, 0],
                            [1, 0, 1],
                            [0, 1, 1],
                            [1, 0, 0]], dtype=torch.bool)
    top = torch.tensor([[0.95, 0.40, 0.02],
                        [0.60, 0.08, 0.50],
                        [0.01, 0.99, 0.99],
                        [0.93, 0.50, 0.50]])
    table = reliability([AnswerDrafts(matches, top)], bins=(0.0, 0.1, 0.9, 1.0))
    cell = lambda j, b: (table[j][b]["count"], table[j][b]["acceptance"], table[j][b]["confidence"])  # noqa: E731
    # row 1, all four states: 0.01 rejected in the low bin; 0.60 accepted; 0.95 and 0.93 accepted
    assert cell(0, 0) == (1, 0.0, pytest.approx(0.01))
    assert cell(0, 1) == (1, 1.0, pytest.approx(0.60))
    assert cell(0, 2) == (2, 1.0, pytest.approx(0.94))
    # row 2: reached by P = 0 (0.40, accepted) and P = 1 (0.08, rejected); P = 2 rejected row 1, P = 3 lies past
    assert cell(1, 0) == (1, 0.0, pytest.approx(0.08)) and cell(1, 1) == (1, 1.0, pytest.approx(0.40))
    # row 3: only P = 0 is inside and reaches it (0.02, rejected); empty bins have no rate
    assert cell(2, 0) == (1, 0.0, pytest.approx(0.02)) and table[2][2]["count"] == 0
    assert "| 1 | 0.00 / 0.01 (1) | 1.00 / 0.60 (1) | 1.00 / 0.94 (2) |" in reliability_table({"rows": table})


def test_rows_checks_and_caching(tmp_path, monkeypatch):
    model = tiny_target("qwen2", vocab=16, seed=3)
    prompts = [" ".join(map(str, p)) for p in random_prompts(5, 16, seed=6)]
    monkeypatch.setitem(eval_datasets.DATASETS, "tiny", lambda: prompts)
    adapter = random_adapter(model, block_size=4, seed=2)
    evaluation = TauEval(model, IdTokenizer(), adapter, tmp_path, max_new_tokens=12, batch_size=2, progress=False)
    rows = evaluation.rows(["tiny"], [4, 3], ["rule", "full"])
    assert len(rows) == 2 * 2 * 2 * 2
    assert all(r["tau"] >= 1.0 and r["answers"] == 5 for r in rows)
    report = evaluation.check_against_decoding("tiny", 3)
    for mode in ("parallel", "sequential"):
        assert report[mode]["identical_to_plain"] == 3 and report[mode]["same_accepted_trace"] == 3
        assert report[mode]["tau_decoded"] == pytest.approx(report[mode]["tau_replayed"])

    monkeypatch.setattr(tau_eval, "answer_drafts", lambda *a: pytest.fail("recomputed a cached result"))
    again = TauEval(model, IdTokenizer(), adapter, tmp_path, max_new_tokens=12, batch_size=2, progress=False)
    assert again.rows(["tiny"], [4, 3], ["rule", "full"]) == rows
    # Another adapter's drafts are never read from the cache (the target's plain answers are).
    other = TauEval(model, IdTokenizer(), random_adapter(model, block_size=4, seed=9), tmp_path, max_new_tokens=12,
                    batch_size=2, progress=False)
    with pytest.raises(pytest.fail.Exception, match="recomputed"):
        other.rows(["tiny"], [4], ["full"])
    table = markdown_table(rows)
    assert table.count("\n") == 2 + 8 and "| tiny | parallel | 4 | rule |" in table
    by_row = evaluation.acceptance_by_row(["tiny"], [4])
    assert [r["calibration"] for r in by_row] == [True, False] and all(len(r["row_acceptance"]) == 3 for r in by_row)
    assert (tmp_path / "rows.jsonl").read_text().count("\n") == 2
    [record] = evaluation.reliability_by_row(["tiny"])
    assert len(record["rows"]) == 3 and (tmp_path / "reliability.jsonl").exists()


def test_next_token_baselines_of_the_training_study():
    from flexdraft_sgl.eval.limits import next_token_baselines

    # successors: 1 -> 2 (twice); 2 -> 3 (three times), 2 -> 1 (once); 3 -> 2; the most frequent token is 2
    train = [[1, 2, 1, 2, 3, 2, 3, 2, 3]]
    held_out = [[1, 2, 3], [3, 2, 9]]  # states (1, 2) (2, 3) (3, 2) (2, 9): the bigram gets the first three
    assert next_token_baselines(train, held_out) == {"states": 4, "bigram": 0.75, "most_frequent": 0.5}
