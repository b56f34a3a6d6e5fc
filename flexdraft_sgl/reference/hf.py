"""Loading Hugging Face targets and turning text into prompts."""

from __future__ import annotations

import torch


def load_target(path: str | None = None, dtype: str = "float32"):
    """(model, tokenizer, path) for a Hugging Face folder; None or "default" is the embedded SmolLM2-135M-Instruct
    (converted on first use)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ..adapter import TargetSpec

    hf_logging.disable_progress_bar()

    if path in (None, "default"):
        from ..default_model import prepare_default_model

        path = str(prepare_default_model())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    TargetSpec.from_hf_config(model.config)  # refuse unsupported families before any work
    return model, tokenizer, path


def prompt_tokens(tokenizer, text: str, chat: bool = True) -> list[int]:
    """Token ids of `text` as a single user turn under the tokenizer's chat template (or raw)."""
    if chat and tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def stop_tokens(model, tokenizer) -> list[int]:
    """The target's end-of-sequence ids, from its generation config and tokenizer."""
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
