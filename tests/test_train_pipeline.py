"""The training pipeline around the objective: ShareGPT parsing, resumable data preparation, resumable training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hf_greedy, random_prompts, tiny_target

from flexdraft_sgl.adapter import FlexDraftAdapter
from flexdraft_sgl.reference import ReferenceEngine
from flexdraft_sgl.train.data import DataConfig, iter_json_array, load_samples, prepare_data, sharegpt_prompts
from flexdraft_sgl.train.trainer import Trainer, TrainConfig, batch_for_step


class CharTokenizer:
    """Just enough tokenizer for prepare_data on a tiny target: one id per character (mod vocab), no template."""

    chat_template = None
    eos_token_id = None

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text: str, add_special_tokens: bool = True):
        return {"input_ids": [ord(ch) % self.vocab for ch in text]}


def conversations(n: int) -> list[dict]:
    out = []
    for i in range(n):
        first = "gpt" if i % 5 == 4 else "human"  # some conversations start with the assistant: skipped
        out.append({"id": str(i), "conversations": [{"from": first, "value": f"question {i} {'x' * (i % 7)}"},
                                                    {"from": "gpt", "value": "an answer, with \"quotes\" ]"}]})
    return out


def test_the_sharegpt_reader_survives_a_truncated_file(tmp_path):
    items = conversations(40)
    text = json.dumps(items, indent=1)
    path = tmp_path / "full.json"
    path.write_text(text)
    assert list(iter_json_array(path, chunk_chars=64)) == items  # elements longer than a chunk, too
    cut = tmp_path / "cut.json"
    cut.write_text(text[: text.index('"id": "31"') + 20])  # the PyPI file ends mid-element like this
    assert list(iter_json_array(cut, chunk_chars=97)) == items[:31]
    prompts = sharegpt_prompts(cut)
    assert prompts == [c["conversations"][0]["value"].strip() for c in items[:31]
                       if c["conversations"][0]["from"] == "human"]


class Interrupt(Exception):
    pass


def test_data_preparation_resumes_without_duplicating_or_losing_samples(tmp_path, monkeypatch):
    model = tiny_target("llama", vocab=32)
    tokenizer = CharTokenizer(32)
    prompts = sharegpt_prompts_from(60)
    config = DataConfig(num_prompts=20, max_prompt_tokens=14, max_new_tokens=6, batch_size=6, seed=3)

    whole = load_samples(prepare_data(ReferenceEngine(model), tokenizer, prompts, tmp_path / "whole", config,
                                      progress=False))
    assert len(whole) == 20 and len({s.index for s in whole}) == 20
    assert all(len(s.prompt_ids) <= 14 for s in whole)
    for s in whole[:3]:  # responses are the target's own greedy continuations
        assert s.response_ids == hf_greedy(model, s.prompt_ids, 6)[: len(s.response_ids)]

    engine = ReferenceEngine(model)
    real_generate, calls = engine.generate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise Interrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", interrupted)
    with pytest.raises(Interrupt):
        prepare_data(engine, tokenizer, prompts, tmp_path / "resumed", config, progress=False)
    assert len(load_samples(tmp_path / "resumed")) == 12  # two whole shards, nothing partial
    (tmp_path / "resumed" / "shard-00002.tmp").write_text('{"index": 1, "prom')  # a half-written shard
    monkeypatch.setattr(engine, "generate", real_generate)
    prepare_data(engine, tokenizer, prompts, tmp_path / "resumed", config, progress=False)
    assert load_samples(tmp_path / "resumed") == whole

    with pytest.raises(ValueError, match="other settings"):
        prepare_data(engine, tokenizer, prompts, tmp_path / "resumed", DataConfig(num_prompts=21), progress=False)


def sharegpt_prompts_from(n: int) -> list[str]:
    return [c["conversations"][0]["value"].strip() for c in conversations(n)
            if c["conversations"][0]["from"] == "human"]


def self_distilled_samples(model, count: int, seed: int):
    from flexdraft_sgl.train.data import Sample

    prompts = random_prompts(count, 32, seed=seed, min_len=3, max_len=6)
    results = ReferenceEngine(model).generate(prompts, max_new_tokens=20, mode="plain")
    return [Sample(i, p, r.tokens) for i, (p, r) in enumerate(zip(prompts, results))]


def test_training_lowers_the_loss_resumes_exactly_and_the_adapter_is_lossless(tmp_path):
    model = tiny_target("qwen3", vocab=32)
    samples = self_distilled_samples(model, 24, seed=1)
    config = TrainConfig(tuned_depth=2, block_size=4, calibration_rank=16, steps=40, sequences_per_step=4,
                         anchors_per_sequence=6, lr=3e-3, warmup_steps=5, checkpoint_every=10, seed=7)

    whole = Trainer(model, None, samples, tmp_path / "whole", config, progress=False)
    whole.run()
    losses = whole.losses
    assert sum(losses[-8:]) / 8 < 0.8 * sum(losses[:8]) / 8, losses

    # interrupted after 20 steps (two checkpoints), then resumed by a new Trainer: the same run, step for step
    part = Trainer(model, None, samples, tmp_path / "part", config, progress=False)
    hidden = part.prepare()
    for _ in range(25):  # 5 steps past the last checkpoint are lost with the "crash"
        part.train_step(hidden)
        if part.step % config.checkpoint_every == 0:
            part.save_checkpoint()
    resumed = Trainer(model, None, samples, tmp_path / "part", config, progress=False)
    assert resumed.step == 20
    resumed.run()
    assert resumed.losses == pytest.approx(losses, rel=1e-5)
    for name, value in whole.adapter.state_dict().items():
        torch.testing.assert_close(resumed.adapter.state_dict()[name], value, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="other settings"):
        Trainer(model, None, samples, tmp_path / "part", TrainConfig(steps=41, block_size=4), progress=False)

    whole.adapter.save(tmp_path / "adapter", dtype=torch.bfloat16)
    loaded = FlexDraftAdapter.load(tmp_path / "adapter", target_config=model.config, dtype=torch.float32)
    assert loaded.config.trained
    engine = ReferenceEngine(model, loaded)
    prompts = random_prompts(4, 32, seed=9)
    for mode in ("parallel", "sequential"):
        for prompt, res in zip(prompts, engine.generate(prompts, max_new_tokens=16, mode=mode)):
            assert res.tokens == hf_greedy(model, prompt, 16)


def test_second_stage_trains_only_the_calibration(tmp_path):
    model = tiny_target("llama", vocab=32)
    samples = self_distilled_samples(model, 8, seed=2)
    config = TrainConfig(tuned_depth=1, block_size=4, calibration_rank=8, steps=3, calibration="second-stage",
                         calibration_steps=3, sequences_per_step=2, anchors_per_sequence=4, checkpoint_every=100)
    trainer = Trainer(model, None, samples, tmp_path, config, progress=False)
    hidden = trainer.prepare()
    snapshot = lambda: {k: v.clone() for k, v in trainer.adapter.state_dict().items()}  # noqa: E731
    start = snapshot()
    for _ in range(3):
        trainer.train_step(hidden)
    stage1 = snapshot()
    assert all(torch.equal(stage1[k], start[k]) for k in start if k.startswith("calibration."))
    assert not torch.equal(stage1["mask_embedding"], start["mask_embedding"])
    for _ in range(3):
        trainer.train_step(hidden)
    stage2 = snapshot()
    assert all(torch.equal(stage2[k], stage1[k]) for k in start if not k.startswith("calibration."))
    assert not torch.equal(stage2["calibration.down.weight"], stage1["calibration.down.weight"])


def test_grad_checkpointing_gives_the_same_gradients(tmp_path):
    model = tiny_target("llama", vocab=32)
    samples = self_distilled_samples(model, 4, seed=3)
    grads = []
    for flag in (False, True):
        config = TrainConfig(tuned_depth=2, block_size=4, calibration_rank=8, steps=1, sequences_per_step=4,
                             anchors_per_sequence=5, grad_checkpointing=flag)
        trainer = Trainer(model, None, samples, tmp_path / str(flag), config, progress=False)
        trainer.train_step(trainer.prepare())
        grads.append({k: p.grad.clone() for k, p in trainer.adapter.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7)


def test_every_sample_is_seen_once_per_epoch():
    config = TrainConfig(sequences_per_step=3, seed=5)
    epoch = [i for step in range(4) for i in batch_for_step(config, 12, step)]
    assert sorted(epoch) == list(range(12))
    assert batch_for_step(config, 12, 4) != batch_for_step(config, 12, 0)  # a new order next epoch


def test_a_run_can_start_from_a_trained_adapter(tmp_path):
    model = tiny_target("llama", vocab=32)
    samples = self_distilled_samples(model, 8, seed=4)
    first = Trainer(model, None, samples, tmp_path / "first",
                    TrainConfig(tuned_depth=1, block_size=4, calibration_rank=8, steps=4, sequences_per_step=2,
                                anchors_per_sequence=4), progress=False)
    first.run().save(tmp_path / "adapter")
    config = TrainConfig(tuned_depth=1, block_size=4, calibration_rank=8, steps=0, calibration="second-stage",
                         calibration_steps=3, sequences_per_step=2, anchors_per_sequence=4,
                         init_adapter=str(tmp_path / "adapter"))
    second = Trainer(model, None, samples, tmp_path / "second", config, progress=False)
    second.run()
    before, after = first.adapter.state_dict(), second.adapter.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("calibration."))
    assert not torch.equal(after["calibration.down.weight"], before["calibration.down.weight"])
    with pytest.raises(ValueError, match="'block_size': 4"):
        Trainer(model, None, samples, tmp_path / "third", TrainConfig(
            tuned_depth=1, block_size=6, calibration_rank=8, steps=1, init_adapter=str(tmp_path / "adapter")),
            progress=False)
