"""Shared fixtures: tiny random targets of each supported family, the embedded default model, HF greedy reference."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import (
    LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM,
)

from flexdraft_sgl.adapter import FlexDraftAdapter

ARCHS = ("llama", "qwen2", "qwen3")


def tiny_target(arch: str = "llama", vocab: int = 32, layers: int = 4, seed: int = 0, init: float = 0.3):
    """A random float32 target. A large init std makes its distributions peaked, so greedy decoding has no near-ties
    that float rounding could flip."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, initializer_range=init,
                  rms_norm_eps=1e-6)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, architectures=["LlamaForCausalLM"]))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, use_sliding_window=False, architectures=["Qwen2ForCausalLM"]))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, use_sliding_window=False,
                                             architectures=["Qwen3ForCausalLM"]))
    else:
        raise ValueError(arch)
    return model.float().eval()


def randomize(adapter: FlexDraftAdapter, seed: int = 0, scale: float = 0.3) -> FlexDraftAdapter:
    """Perturb every adapter weight so mask rows really differ from the target (a 'random adapter')."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * scale)
    return adapter


def random_adapter(model, *, tuned_depth=2, block_size=4, rank=16, seed=0, scale=0.3, tokenizer=None,
                   calibration_form="logits", calibration_input="unit-rms", draft_vocab=None):
    """`draft_vocab`: token ids the drafts are restricted to (needs calibration_form "hidden")."""
    adapter = FlexDraftAdapter.init_from_target(model, tuned_depth=tuned_depth, block_size=block_size,
                                                calibration_rank=rank, calibration_form=calibration_form,
                                                calibration_input=calibration_input, tokenizer=tokenizer)
    adapter = randomize(adapter, seed=seed, scale=scale)
    return adapter if draft_vocab is None else adapter.with_draft_vocab(torch.tensor(draft_vocab))


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    """The target's own greedy output through Hugging Face generate (explicit attention mask: prompts may contain
    the pad id)."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def random_prompts(n: int, vocab: int, seed: int, min_len: int = 1, max_len: int = 12) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (n,), generator=g)
    return [torch.randint(0, vocab, (int(k),), generator=g).tolist() for k in lens]


@functools.lru_cache(maxsize=None)
def _default_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flexdraft_sgl.default_model import prepare_default_model

    path = prepare_default_model()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded default, converted once into the cache."""
    return _default_model()


@pytest.fixture(scope="session")
def smollm2_adapter(smollm2, tmp_path_factory):
    """A random (untrained) adapter for SmolLM2 as a folder: N = 4, B = 8."""
    model, tokenizer = smollm2
    folder = tmp_path_factory.mktemp("smollm2-adapter")
    random_adapter(model, tuned_depth=4, block_size=8, rank=32, scale=0.02, tokenizer=tokenizer).save(folder)
    return str(folder)
