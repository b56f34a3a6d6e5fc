"""Randomly initialised EAGLE-3 draft heads for Llama-family targets, saved as SGLang 0.5.23 loads EAGLE-3 drafts
(`LlamaForCausalLMEagle3` in sglang/srt/models/llama_eagle3.py; the layout of published EAGLE-3 checkpoints):

- config.json: the target's Llama fields with `architectures: ["LlamaForCausalLMEagle3"]`, one hidden layer, untied
  embeddings and `draft_vocab_size`; `eagle_config.eagle_aux_hidden_state_layer_ids` only when the caller names the
  target layers whose outputs the head reads (SGLang's default reads three: the inputs of target layers 2, L // 2 and
  L - 3, `LlamaForCausalLM.set_eagle3_layers_to_capture` in sglang/srt/models/llama.py);
- model.safetensors: `fc` [H, n_aux * H], the decoder layer `midlayer.*` whose q/k/v projections take 2H (token
  embedding and hidden state side by side) plus its `hidden_norm`, the final `norm`, `lm_head` [draft_vocab, H],
  `d2t` (draft id -> target id offset) and `t2d` (target ids the head can propose). No embedding: SGLang gives the
  head the target's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def _aux_layer_count(num_layers: int, aux_layer_ids: list[int] | None) -> int:
    if aux_layer_ids is None:
        captured = {2, num_layers // 2, num_layers - 3}
        if len(captured) < 3 or min(captured) < 1:
            raise ValueError(f"SGLang's default aux layers repeat for a {num_layers}-layer target: pass "
                             f"aux_layer_ids (distinct target layers in 0..{num_layers - 2})")
        return 3
    if len(set(aux_layer_ids)) != len(aux_layer_ids) or not all(0 <= i <= num_layers - 2 for i in aux_layer_ids):
        raise ValueError(f"aux_layer_ids {aux_layer_ids}: need distinct target layers in 0..{num_layers - 2} (SGLang "
                         f"reads a layer's output as the next layer's input, so the last layer cannot be read)")
    return len(aux_layer_ids)


def save_random_eagle3(target_config, out_dir, *, draft_vocab_size: int | None = None,
                       aux_layer_ids: list[int] | None = None, seed: int = 0, std: float = 0.02) -> Path:
    """Write a random EAGLE-3 head for a target with this (transformers) Llama config into out_dir; returns it.

    draft_vocab_size < the target's vocabulary makes the head propose a random subset of the target's tokens
    (through d2t, as trained heads do with their most frequent ones). Weights are N(0, std) in float32, norms 1."""
    base = target_config.to_dict()
    hidden, vocab, layers = base["hidden_size"], base["vocab_size"], base["num_hidden_layers"]
    heads, kv_heads = base["num_attention_heads"], base["num_key_value_heads"]
    head_dim = base.get("head_dim") or hidden // heads
    n_aux = _aux_layer_count(layers, aux_layer_ids)
    draft_vocab = draft_vocab_size or vocab
    g = torch.Generator().manual_seed(seed)
    normal = lambda *shape: torch.randn(*shape, generator=g) * std  # noqa: E731
    hot = torch.randperm(vocab, generator=g)[:draft_vocab].sort().values
    weights = {
        "fc.weight": normal(hidden, n_aux * hidden),
        "midlayer.self_attn.q_proj.weight": normal(heads * head_dim, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": normal(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": normal(kv_heads * head_dim, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": normal(hidden, heads * head_dim),
        "midlayer.mlp.gate_proj.weight": normal(base["intermediate_size"], hidden),
        "midlayer.mlp.up_proj.weight": normal(base["intermediate_size"], hidden),
        "midlayer.mlp.down_proj.weight": normal(hidden, base["intermediate_size"]),
        **{f"midlayer.{norm}.weight": torch.ones(hidden)
           for norm in ("input_layernorm", "hidden_norm", "post_attention_layernorm")},
        "norm.weight": torch.ones(hidden),
        "lm_head.weight": normal(draft_vocab, hidden),
        "d2t": hot - torch.arange(draft_vocab),
        "t2d": torch.zeros(vocab, dtype=torch.bool).index_fill_(0, hot, True),
    }
    config = {**base, "architectures": ["LlamaForCausalLMEagle3"], "num_hidden_layers": 1,
              "tie_word_embeddings": False, "draft_vocab_size": draft_vocab}
    if aux_layer_ids is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids),
                                  "use_aux_hidden_state": True}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / "model.safetensors"))
    return out
