"""The EAGLE-3 checkpoint layout SGLang 0.5.23 loads (`LlamaForCausalLMEagle3` in sglang/srt/models/llama_eagle3.py;
the layout of published EAGLE-3 checkpoints), and which target features a head reads:

- config.json: the target's Llama fields with `architectures: ["LlamaForCausalLMEagle3"]`, one hidden layer, untied
  embeddings and `draft_vocab_size`; `eagle_config.eagle_aux_hidden_state_layer_ids` only when the caller names the
  target layers whose outputs the head reads (SGLang's default reads three: the inputs of target layers 2, L // 2 and
  L - 3, `LlamaForCausalLM.set_eagle3_layers_to_capture` in sglang/srt/models/llama.py);
- model.safetensors: `fc` [H, n_aux * H], the decoder layer `midlayer.*` whose q/k/v projections take 2H (token
  embedding and hidden state side by side) plus its `hidden_norm`, the final `norm`, `lm_head` [draft_vocab, H],
  `d2t` (draft id -> target id offset) and `t2d` (target ids the head can propose). No embedding: SGLang gives the
  head the target's.

`model.Eagle3Draft` holds such a head as a torch module; its `save` is the one writer of the layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def captured_layers(num_layers: int, aux_layer_ids: list[int] | None) -> list[int]:
    """The target layers whose INPUTS (the residual stream entering them, i.e. Hugging Face's hidden_states[i])
    SGLang hands the head, in fc's order. SGLang captures at layer i's entry: by default layers 2, L // 2, L - 3;
    for named aux layers a, the entry of a + 1 (the output of layer a)."""
    if aux_layer_ids is None:
        captured = [2, num_layers // 2, num_layers - 3]
        if len(set(captured)) < 3 or min(captured) < 1:
            raise ValueError(f"SGLang's default aux layers repeat for a {num_layers}-layer target: pass "
                             f"aux_layer_ids (distinct target layers in 0..{num_layers - 2})")
        return captured
    if len(set(aux_layer_ids)) != len(aux_layer_ids) or not all(0 <= i <= num_layers - 2 for i in aux_layer_ids):
        raise ValueError(f"aux_layer_ids {aux_layer_ids}: need distinct target layers in 0..{num_layers - 2} (SGLang "
                         f"reads a layer's output as the next layer's input, so the last layer cannot be read)")
    return [i + 1 for i in aux_layer_ids]


def eagle3_config(target_config, draft_vocab_size: int, aux_layer_ids: list[int] | None) -> dict:
    """config.json of a head for a target with this (transformers) config."""
    config = {**target_config.to_dict(), "architectures": ["LlamaForCausalLMEagle3"], "num_hidden_layers": 1,
              "tie_word_embeddings": False, "draft_vocab_size": draft_vocab_size}
    if aux_layer_ids is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(aux_layer_ids),
                                  "use_aux_hidden_state": True}
    return config


def write_eagle3(config: dict, weights: dict[str, torch.Tensor], out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(out / WEIGHTS_FILE))
    return out


def read_eagle3(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    folder = Path(folder)
    return json.loads((folder / CONFIG_FILE).read_text()), load_file(str(folder / WEIGHTS_FILE))


def save_random_eagle3(target_config, out_dir, *, draft_vocab_size: int | None = None,
                       aux_layer_ids: list[int] | None = None, seed: int = 0, std: float = 0.02) -> Path:
    """Write a random EAGLE-3 head for a target with this (transformers) Llama config into out_dir; returns it.

    draft_vocab_size < the target's vocabulary makes the head propose a random subset of the target's tokens
    (through d2t, as trained heads do with their most frequent ones). Weights are N(0, std) in float32, norms 1."""
    from .model import Eagle3Draft

    draft = Eagle3Draft(target_config, draft_vocab_size or target_config.vocab_size, aux_layer_ids)
    return draft.randomize(seed, std).save(out_dir, dtype=torch.float32)
