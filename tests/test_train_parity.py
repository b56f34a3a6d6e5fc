"""Training trains exactly what decoding serves: the hidden states the trainer caches are what decoding feeds the
split layer, and the loss's per-row predictions are the drafts `eval-tau` replays at the same states."""

from __future__ import annotations

import pytest
import torch
from conftest import random_prompts, tiny_target

from flexdraft_sgl.core.layout import parallel_layout, prefill_layout
from flexdraft_sgl.eval.tau import answer_drafts
from flexdraft_sgl.reference import ReferenceEngine
from flexdraft_sgl.train.data import Sample
from flexdraft_sgl.train.objective import packed_draft_logits
from flexdraft_sgl.train.trainer import Trainer, TrainConfig


def decoding_split_inputs(engine: ReferenceEngine, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """The hidden states decoding feeds layer s at the positions of prompt + answer: the prefill of the prompt (with
    its mask block), then one parallel step with the answer as its candidates [bonus, drafts] over the cached
    prompt, read off the input of layer s."""
    B = engine.block_size
    captured = []
    hook = engine.layers[engine.split_layer].input_layernorm.register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().clone()))
    try:
        cache = engine.new_cache(1, len(prompt) + len(answer) + 2 * B)
        with torch.no_grad():
            prefill = prefill_layout([len(prompt)], B)
            engine.forward(prefill, torch.tensor(prompt), cache)
            step = parallel_layout([len(prompt)], [len(answer) - 1], B)
            engine.forward(step, torch.tensor(answer), cache)
    finally:
        hook.remove()
    assert len(captured) == 2  # layer s ran once per forward
    return torch.cat([captured[0][prefill.candidate_rows], captured[1][step.candidate_rows]])


def sample_pairs(model, count: int, vocab: int, seed: int) -> list[Sample]:
    prompts = random_prompts(count, vocab, seed=seed, min_len=3, max_len=9)
    results = ReferenceEngine(model).generate(prompts, max_new_tokens=7, mode="plain")
    return [Sample(i, p, r.tokens) for i, (p, r) in enumerate(zip(prompts, results))]


def assert_trainer_caches_decoding_inputs(model, tokenizer, samples, tmp_path, tuned_depth, block_size):
    config = TrainConfig(tuned_depth=tuned_depth, block_size=block_size, calibration_rank=8, steps=1)
    trainer = Trainer(model, tokenizer, samples, tmp_path, config, progress=False)
    cached = trainer.split_hidden()
    for sample, hidden in zip(samples, cached):
        expected = decoding_split_inputs(trainer.engine, sample.prompt_ids, sample.response_ids)
        assert hidden.shape == expected.shape
        torch.testing.assert_close(hidden, expected, rtol=1e-4, atol=1e-4)
        # and not the last layer's output, which the trainer once cached (relative difference far above 1e-4)
        assert (hidden - trainer.engine.forward(prefill_layout([len(sample.tokens)], block_size, with_block=False),
                                                torch.tensor(sample.tokens), None)).norm() > 0.1 * hidden.norm()
    return trainer


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_the_trainer_caches_what_decoding_feeds_the_split_layer(arch, tmp_path):
    model = tiny_target(arch, vocab=32, layers=4)
    samples = sample_pairs(model, 3, 32, seed=11)
    assert_trainer_caches_decoding_inputs(model, None, samples, tmp_path, tuned_depth=2, block_size=8)


@pytest.mark.slow
def test_the_trainer_caches_what_decoding_feeds_the_split_layer_of_smollm2(smollm2, tmp_path):
    from flexdraft_sgl.reference.hf import prompt_tokens

    model, tokenizer = smollm2
    prompts = [prompt_tokens(tokenizer, text) for text in ("What is a prime number?", "Name three rivers.")]
    results = ReferenceEngine(model).generate(prompts, max_new_tokens=7, mode="plain")
    samples = [Sample(i, p, r.tokens) for i, (p, r) in enumerate(zip(prompts, results))]
    assert_trainer_caches_decoding_inputs(model, tokenizer, samples, tmp_path, tuned_depth=4, block_size=8)


def test_a_split_cache_or_checkpoint_of_the_old_trainer_is_refused(tmp_path):
    model = tiny_target("llama", vocab=32)
    samples = sample_pairs(model, 2, 32, seed=12)
    config = TrainConfig(tuned_depth=2, block_size=4, calibration_rank=8, steps=2, checkpoint_every=1)
    trainer = Trainer(model, None, samples, tmp_path, config, progress=False)
    true_inputs = trainer.split_hidden()
    # what the old trainer left: a key without the format, holding other states (the last layer's output)
    old_key = {"split_layer": trainer.engine.split_layer, "lengths": [len(x) for x in trainer.sequences],
               "dtype": "float32", "indices": [s.index for s in samples]}
    torch.save({"key": old_key, "hidden": [h + 100.0 for h in true_inputs]}, tmp_path / "split_hidden.pt")
    again = Trainer(model, None, samples, tmp_path, config, progress=False).split_hidden()
    for h, t in zip(again, true_inputs):
        torch.testing.assert_close(h, t)

    trainer.train_step(true_inputs)
    trainer.save_checkpoint()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del state["key"]["split_hidden"]  # as the old trainer wrote it
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="older trainer"):
        Trainer(model, None, samples, tmp_path, config, progress=False)


@pytest.mark.parametrize("form,scaling", [("logits", "unit-rms"), ("hidden", "raw")])
def test_the_loss_predicts_the_drafts_eval_tau_replays(form, scaling, tmp_path):
    model = tiny_target("qwen3", vocab=32)
    samples = sample_pairs(model, 8, 32, seed=13)
    config = TrainConfig(tuned_depth=2, block_size=4, calibration_rank=16, calibration_form=form,
                         calibration_input=scaling, steps=12, sequences_per_step=4, anchors_per_sequence=5,
                         lr=3e-3, warmup_steps=2, mask_init="token-scale", checkpoint_every=100)
    trainer = Trainer(model, None, samples, tmp_path, config, progress=False)
    adapter = trainer.run()
    assert adapter.calibration.down.weight.abs().sum() > 0  # calibration really trained
    split_hidden = trainer.prepare()
    indices, anchors = trainer.step_inputs(trainer.step)  # the batch the next step's loss would score
    with torch.no_grad():
        blocks, logits = packed_draft_logits(trainer.engine, [trainer.sequences[i] for i in indices], anchors,
                                             [split_hidden[i] for i in indices])
    engine = ReferenceEngine(model, adapter)  # eval-tau's engine: the same weights, decoding's forward
    compared = 0
    for b, (owner, anchor) in enumerate(zip(blocks.owner.tolist(), blocks.anchor.tolist())):
        sample = samples[indices[owner]]
        drafts, _ = answer_drafts(engine, sample.prompt_ids, sample.response_ids)
        state = anchor - (len(sample.prompt_ids) - 1)  # the bonus is answer[state]
        valid = blocks.valid[b]
        predicted = logits[b].argmax(-1) == blocks.targets[b]
        assert torch.equal(drafts.matches[state], predicted & valid)
        torch.testing.assert_close(drafts.top[state], torch.softmax(logits[b], -1).amax(-1), rtol=1e-4, atol=1e-5)
        compared += 1
    assert compared == sum(len(a) for a in anchors) > 10
