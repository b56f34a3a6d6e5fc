"""Adapter persistence and validation against a target."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_adapter, tiny_target

from flexdraft_sgl.adapter import (
    CONFIG_FILE, TARGET_CONFIG_FILE, WEIGHTS_FILE, AdapterConfig, AdapterError, FlexDraftAdapter, TargetSpec,
    UnsupportedTargetError,
)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_save_load_round_trip(tmp_path, arch):
    model = tiny_target(arch)
    adapter = random_adapter(model, tuned_depth=2, block_size=5, rank=8)
    adapter.save(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE, TARGET_CONFIG_FILE}
    loaded = FlexDraftAdapter.load(tmp_path, target_config=model.config)
    assert loaded.config == adapter.config
    assert loaded.target_hf_config["model_type"] == model.config.model_type  # config.json, which SGLang reads
    for (name, a), (_, b) in zip(adapter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    spec = loaded.config.target
    assert (spec.qk_norm, spec.attention_bias) == {"llama": (False, False), "qwen2": (False, True),
                                                   "qwen3": (True, False)}[arch]


def test_init_copies_the_target_projectors():
    model = tiny_target("qwen3", layers=5)
    adapter = FlexDraftAdapter.init_from_target(model, tuned_depth=2, block_size=4, calibration_rank=8)
    assert adapter.config.split_layer == 3
    for i, tuned in enumerate(adapter.attention):
        target = model.model.layers[3 + i].self_attn
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            assert torch.equal(getattr(tuned, name).weight, getattr(target, name).weight)
    # an untrained calibration adds nothing
    out = adapter.calibration(torch.randn(3, 64), torch.randn(3, 64))
    assert out.shape == (3, 32) and not out.any()


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(num_hidden_layers=5), "num_layers"),
        (dict(hidden_size=128), "hidden_size"),
        (dict(num_attention_heads=8), "num_heads"),
        (dict(num_key_value_heads=4), "num_kv_heads"),
        (dict(vocab_size=40), "vocab_size"),
    ],
)
def test_mismatched_target_is_refused_naming_the_field(tmp_path, change, field):
    model = tiny_target("llama")
    random_adapter(model).save(tmp_path)
    other = model.config.__class__(**{**model.config.to_dict(), **change})
    with pytest.raises(AdapterError, match=f"different target.*{field}: adapter"):
        FlexDraftAdapter.load(tmp_path, target_config=other)


def test_other_family_and_head_dim_are_refused(tmp_path):
    random_adapter(tiny_target("llama")).save(tmp_path)
    with pytest.raises(AdapterError, match="architecture: adapter 'LlamaForCausalLM', target 'Qwen3ForCausalLM'"):
        FlexDraftAdapter.load(tmp_path, target_config=tiny_target("qwen3").config)
    spec = TargetSpec.from_hf_config(tiny_target("llama").config)
    config = AdapterConfig(target=spec, tuned_depth=2, block_size=4, calibration_rank=8)
    with pytest.raises(AdapterError, match="head_dim: adapter 16, target 32"):
        config.check_target(TargetSpec(**{**spec.__dict__, "head_dim": 32}))


def test_vocabulary_mismatch_is_refused():
    spec = TargetSpec.from_hf_config(tiny_target("llama").config)
    config = AdapterConfig(target=spec, tuned_depth=2, block_size=4, calibration_rank=8, vocab_digest="aa")
    with pytest.raises(AdapterError, match="vocabulary"):
        config.check_target(spec, "bb")
    config.check_target(spec, "aa")


def test_unsupported_target_and_bad_settings():
    cfg = tiny_target("llama").config
    cfg.architectures = ["MistralForCausalLM"]
    with pytest.raises(UnsupportedTargetError, match="supports LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        TargetSpec.from_hf_config(cfg)
    spec = TargetSpec.from_hf_config(tiny_target("llama").config)
    with pytest.raises(AdapterError, match="tuned_depth"):
        AdapterConfig(target=spec, tuned_depth=9, block_size=4, calibration_rank=8)
    with pytest.raises(AdapterError, match="block_size"):
        AdapterConfig(target=spec, tuned_depth=2, block_size=1, calibration_rank=8)


def test_broken_adapter_folders_give_clear_errors(tmp_path):
    model = tiny_target("llama")
    with pytest.raises(AdapterError, match="does not exist"):
        FlexDraftAdapter.load(tmp_path / "nope")
    random_adapter(model).save(tmp_path)
    (tmp_path / WEIGHTS_FILE).rename(tmp_path / "moved")
    with pytest.raises(AdapterError, match="adapter.safetensors is missing"):
        FlexDraftAdapter.load(tmp_path)
    (tmp_path / "moved").rename(tmp_path / WEIGHTS_FILE)

    cfg_path = tmp_path / CONFIG_FILE
    data = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**data, "target": {**data["target"], "vocab_size": 33}}))
    with pytest.raises(AdapterError, match="fingerprint"):
        FlexDraftAdapter.load(tmp_path)
    cfg_path.write_text(json.dumps({**data, "mask_layout": "something-else"}))
    with pytest.raises(AdapterError, match="mask layout"):
        FlexDraftAdapter.load(tmp_path)
    cfg_path.write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        FlexDraftAdapter.load(tmp_path)
    # weights that do not fit the config (rank changed, fingerprint recomputed)
    cfg_path.write_text(AdapterConfig.from_json(json.dumps(data)).__class__(
        **{**AdapterConfig.from_json(json.dumps(data)).__dict__, "calibration_rank": 9}).to_json())
    with pytest.raises(AdapterError, match="calibration.up.weight has shape"):
        FlexDraftAdapter.load(tmp_path)


def test_a_draft_vocabulary_restricts_drafts_and_survives_save_and_load(tmp_path):
    from safetensors.torch import load_file, save_file

    from flexdraft_sgl.adapter.modules import DraftHead

    model = tiny_target("llama")
    vocab = model.config.vocab_size
    ids = [3, 17, 5, 30]
    adapter = random_adapter(model, calibration_form="hidden", draft_vocab=ids)
    assert adapter.config.draft_vocab_size == 4 and adapter.config.draft_head_fraction == 4 / vocab
    adapter.save(tmp_path, dtype=torch.bfloat16)  # the weights in bfloat16, the token ids still exact int64
    loaded = FlexDraftAdapter.load(tmp_path, target_config=model.config)
    assert loaded.draft_vocab.dtype == torch.long and loaded.draft_vocab.tolist() == ids
    assert loaded.mask_embedding.dtype == torch.bfloat16 and loaded.config == adapter.config

    # The head: the target's logits on the draft vocabulary, -inf on every other token.
    weight, hidden = torch.randn(vocab, 32), torch.randn(2, 3, 32)
    logits = loaded.draft_head(weight)(hidden)
    full = DraftHead(weight, None, vocab)(hidden)
    assert logits.shape == full.shape == (2, 3, vocab)
    assert torch.allclose(logits[..., ids], full[..., ids])
    others = torch.ones(vocab, dtype=torch.bool)
    others[ids] = False
    assert torch.isneginf(logits[..., others]).all()
    assert adapter.with_draft_vocab(None).config.draft_vocab_size == 0

    with pytest.raises(AdapterError, match="hidden-form calibration"):
        random_adapter(model, draft_vocab=ids)  # logits form
    with pytest.raises(AdapterError, match="outside the target's vocabulary"):
        adapter.with_draft_vocab(torch.tensor([1, vocab]))
    with pytest.raises(AdapterError, match="repeats"):
        adapter.with_draft_vocab(torch.tensor([1, 1]))
    state = load_file(str(tmp_path / WEIGHTS_FILE))
    save_file({**state, "draft_vocab": torch.tensor([0, 1, 2, vocab + 5])}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(AdapterError, match="outside the target's vocabulary"):
        FlexDraftAdapter.load(tmp_path)
