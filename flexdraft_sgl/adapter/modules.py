"""The adapter's weights: the only trained part of FlexDraft.

  mask_embedding     [B, H]: the hidden state mask row j of a block enters the split layer with. One vector per row,
                     where the paper has one for all: rows that enter alike differ only through rotary positions,
                     and a short training run then drafts about the same token on every row (measured: see
                     flexdraft_sgl/default_adapter/README.md)
  attention[i]       tuned q/k/v/o projectors (and q/k norms where the target has them) for mask rows in the i-th of
                     the final N layers; candidate and prompt rows keep the target's own
  calibration        Linear(2H -> r) -> SiLU -> Linear(r -> V) over [embedding(bonus), final-normed mask hidden],
                     added to the mask row's draft logits (or Linear(r -> H) added before the LM head: `CalibrationMLP`)
  draft_vocab        [V'] (optional): the token ids drafts are drawn from, the most frequent in the training answers;
                     a draft row then reads V' rows of the LM head instead of all V (`DraftHead`)

Saved as a folder: `flexdraft_adapter.json` (AdapterConfig), `adapter.safetensors`, and `config.json`, the target's
own Hugging Face config: SGLang reads `--speculative-draft-model-path` as a model config for every algorithm, and this
one describes exactly the model the drafts run on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import CALIBRATION_FORMS, CALIBRATION_INPUTS, AdapterConfig, AdapterError, TargetSpec

CONFIG_FILE = "flexdraft_adapter.json"
WEIGHTS_FILE = "adapter.safetensors"
TARGET_CONFIG_FILE = "config.json"


class RMSNorm(nn.Module):
    """Per-head RMS norm with the same arithmetic as the Llama-family targets' (float32 inside)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class TunedAttention(nn.Module):
    """Mask rows' own attention projectors for one of the final N layers."""

    def __init__(self, spec: TargetSpec, eps: float = 1e-6):
        super().__init__()
        H, hd = spec.hidden_size, spec.head_dim
        bias = spec.attention_bias
        self.q_proj = nn.Linear(H, spec.num_heads * hd, bias=bias)
        self.k_proj = nn.Linear(H, spec.num_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(H, spec.num_kv_heads * hd, bias=bias)
        # Qwen2 has biases on q/k/v only; o_proj follows the target module when initialised from it.
        self.o_proj = nn.Linear(spec.num_heads * hd, H, bias=bias and spec.architecture != "Qwen2ForCausalLM")
        self.q_norm = RMSNorm(hd, eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(hd, eps) if spec.qk_norm else None

    def copy_from(self, target_attention: nn.Module) -> None:
        """Initialise from the target layer's attention (the spec: tuned projectors start as the target's)."""
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            mine = getattr(self, name)
            if mine is not None:
                mine.load_state_dict(getattr(target_attention, name).state_dict())


def _unit_rms(x: Tensor) -> Tensor:
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


class CalibrationMLP(nn.Module):
    """Bonus-guided calibration: a correction computed from [embedding(bonus), final-normed draft hidden].

    form "logits" (the paper's): Linear(2H -> r) -> SiLU -> Linear(r -> V), added to the draft logits.
    form "hidden": Linear(2H -> r) -> SiLU -> Linear(r -> H), added to the final-normed hidden state before the
      target's LM head. The head is linear, so this is the logits form with its down weight factored through the head
      (r x H weights instead of r x V): a large rank costs little.
    input "unit-rms": both halves scaled to unit RMS first (a token embedding is about 14 times smaller than a
      final-normed hidden state on SmolLM2); "raw": as they come (the authors' release).
    """

    def __init__(self, hidden_size: int, rank: int, vocab_size: int, form: str = "logits",
                 input_scaling: str = "unit-rms"):
        super().__init__()
        if form not in CALIBRATION_FORMS or input_scaling not in CALIBRATION_INPUTS:
            raise ValueError(f"calibration form must be one of {CALIBRATION_FORMS} and input one of "
                             f"{CALIBRATION_INPUTS}, got {form!r} / {input_scaling!r}")
        self.form, self.input_scaling, self.vocab_size = form, input_scaling, vocab_size
        self.up = nn.Linear(2 * hidden_size, rank)
        self.down = nn.Linear(rank, vocab_size if form == "logits" else hidden_size)
        # Zero output layer: an untrained adapter calibrates nothing instead of adding noise.
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, bonus_embedding: Tensor, hidden: Tensor) -> Tensor:
        """The correction, in logits (form "logits") or in final-normed hidden space (form "hidden")."""
        if self.input_scaling == "unit-rms":
            bonus_embedding, hidden = _unit_rms(bonus_embedding), _unit_rms(hidden)
        return self.down(nn.functional.silu(self.up(torch.cat([bonus_embedding, hidden], dim=-1))))

    def corrected(self, bonus_embedding: Tensor, hidden: Tensor) -> Tensor:
        """Form "hidden": the final-normed state with the correction added, what the LM head reads."""
        return hidden + self(bonus_embedding, hidden)

    def logits(self, bonus_embedding: Tensor, hidden: Tensor, head) -> Tensor:
        """Calibrated draft logits of final-normed `hidden`; `head` maps hidden states to logits (the LM head)."""
        if self.form == "hidden":
            return head(self.corrected(bonus_embedding, hidden))[..., :self.vocab_size]
        # a padded vocabulary keeps its first V columns
        return head(hidden)[..., :self.vocab_size] + self(bonus_embedding, hidden)


class DraftHead:
    """hidden -> draft logits [..., vocab_size]: the target's LM head, or with a draft vocabulary only the head's rows
    for those tokens (SmolLM2: 4,096 of 49,152, the head being a fifth of a decode step's weights) and every other
    token's logit -inf, so it is never drafted and has draft probability 0. Only drafts read this head; verification
    reads the target's own, so the restriction can cost acceptance, never correctness. `linear` computes F.linear
    (the SGLang worker passes its CPU routine)."""

    def __init__(self, lm_head_weight: Tensor, draft_vocab: Tensor | None, vocab_size: int, linear=F.linear):
        self.vocab_size, self.linear = vocab_size, linear
        # Sorted, so that the first maximum over `compact` logits is the first over the full vocabulary (argmax ties).
        self.token_ids = None if draft_vocab is None else draft_vocab.sort().values
        self.rows = lm_head_weight if draft_vocab is None else lm_head_weight[self.token_ids]  # gathered once

    def compact(self, hidden: Tensor) -> Tensor:
        """Logits [..., V'] of the draft vocabulary's tokens alone, in `token_ids` order (all of the head's without)."""
        return self.linear(hidden, self.rows)

    def __call__(self, hidden: Tensor) -> Tensor:
        if self.token_ids is None:
            return self.compact(hidden)
        logits = hidden.new_full((*hidden.shape[:-1], self.vocab_size), float("-inf"))
        return logits.scatter_(-1, self.token_ids.expand(*hidden.shape[:-1], -1), self.compact(hidden))


class FlexDraftAdapter(nn.Module):
    def __init__(self, config: AdapterConfig, rms_norm_eps: float = 1e-6):
        super().__init__()
        spec = config.target
        self.config = config
        self.mask_embedding = nn.Parameter(torch.zeros(config.block_size, spec.hidden_size))
        self.attention = nn.ModuleList(TunedAttention(spec, rms_norm_eps) for _ in range(config.tuned_depth))
        self.calibration = CalibrationMLP(spec.hidden_size, config.calibration_rank, spec.vocab_size,
                                          config.calibration_form, config.calibration_input)
        if config.draft_vocab_size:
            self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size))
        else:
            self.draft_vocab: Tensor | None = None
        self.target_hf_config: dict | None = None  # written beside the adapter for SGLang (see module docstring)

    def with_draft_vocab(self, token_ids: Tensor | None) -> FlexDraftAdapter:
        """This adapter drafting from `token_ids` alone (None: the whole vocabulary); the weights are shared."""
        vocab = self.config.target.vocab_size
        if token_ids is not None:
            token_ids = torch.as_tensor(token_ids, dtype=torch.long).flatten().cpu()
            _check_draft_vocab(token_ids, vocab, "the draft vocabulary")
        config = dataclasses.replace(self.config, draft_vocab_size=0 if token_ids is None else len(token_ids))
        other = FlexDraftAdapter(config)
        other.mask_embedding, other.attention, other.calibration = self.mask_embedding, self.attention, self.calibration
        if token_ids is not None:
            other.draft_vocab = token_ids.to(self.mask_embedding.device)
        other.target_hf_config = self.target_hf_config
        return other

    def draft_head(self, lm_head_weight: Tensor, linear=F.linear):
        """The LM head the drafts read (`DraftHead`), over the target's `lm_head_weight`."""
        vocab = None if self.draft_vocab is None else self.draft_vocab.to(lm_head_weight.device)
        return DraftHead(lm_head_weight, vocab, self.config.target.vocab_size, linear)

    # ---- construction ------------------------------------------------------------------------------------------
    @classmethod
    def init_from_target(cls, model: nn.Module, *, tuned_depth: int, block_size: int = 16,
                         calibration_rank: int = 256, calibration_form: str = "logits",
                         calibration_input: str = "unit-rms", tokenizer=None, target_name: str = "",
                         seed: int = 0) -> FlexDraftAdapter:
        """An untrained adapter for a Hugging Face target: projectors copied from its final `tuned_depth` layers, the
        mask embeddings set to the mean token embedding, calibration initialised to add nothing."""
        from .config import vocab_digest

        spec = TargetSpec.from_hf_config(model.config)
        config = AdapterConfig(
            target=spec, tuned_depth=tuned_depth, block_size=block_size, calibration_rank=calibration_rank,
            calibration_form=calibration_form, calibration_input=calibration_input, target_name=target_name,
            vocab_digest=vocab_digest(tokenizer) if tokenizer is not None else None,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            adapter = cls(config, rms_norm_eps=getattr(model.config, "rms_norm_eps", 1e-6))
        layers = model.model.layers
        for i, tuned in enumerate(adapter.attention):
            tuned.copy_from(layers[config.split_layer + i].self_attn)
        with torch.no_grad():
            adapter.mask_embedding.copy_(model.get_input_embeddings().weight.float().mean(0).expand_as(
                adapter.mask_embedding))
        adapter.target_hf_config = model.config.to_dict()
        param = next(model.parameters())
        return adapter.to(device=param.device, dtype=param.dtype)

    # ---- persistence -------------------------------------------------------------------------------------------
    def save(self, directory: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the folder; `dtype` stores the weights in another precision (bfloat16 halves the file)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(dtype if dtype and v.is_floating_point() else v.dtype).contiguous().cpu()
                   for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": self.config.format})
        (directory / CONFIG_FILE).write_text(self.config.to_json())
        if self.target_hf_config is not None:
            (directory / TARGET_CONFIG_FILE).write_text(json.dumps(self.target_hf_config, indent=2, default=str))
        return directory

    @classmethod
    def load(cls, directory: str | Path, *, target_config=None, tokenizer=None, device=None,
             dtype=None) -> FlexDraftAdapter:
        """Load an adapter folder; with `target_config` (a transformers config) refuse it unless it was built for
        that target, naming the mismatch."""
        from .config import vocab_digest

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not directory.is_dir():
            raise AdapterError(f"adapter folder {directory} does not exist")
        for path in (config_path, weights_path):
            if not path.is_file():
                raise AdapterError(f"{path} is missing: not a FlexDraft adapter folder")
        config = AdapterConfig.from_json(config_path.read_text(), source=str(config_path))
        if target_config is not None:
            config.check_target(
                TargetSpec.from_hf_config(target_config),
                vocab_digest(tokenizer) if tokenizer is not None else None,
            )
        eps = getattr(target_config, "rms_norm_eps", 1e-6) if target_config is not None else 1e-6
        adapter = cls(config, rms_norm_eps=eps)
        state = load_file(str(weights_path))
        expected = adapter.state_dict()
        problems = [f"missing {k}" for k in expected if k not in state]
        problems += [f"unexpected {k}" for k in state if k not in expected]
        problems += [
            f"{k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}"
            for k, v in expected.items() if k in state and state[k].shape != v.shape
        ]
        if problems:
            raise AdapterError(f"{weights_path} does not match its config: " + "; ".join(problems[:5]))
        if "draft_vocab" in state:
            _check_draft_vocab(state["draft_vocab"], config.target.vocab_size, str(weights_path))
        adapter.load_state_dict(state)
        if (directory / TARGET_CONFIG_FILE).is_file():
            adapter.target_hf_config = json.loads((directory / TARGET_CONFIG_FILE).read_text())
        weights_dtype = next(v.dtype for v in state.values() if v.is_floating_point())
        return adapter.to(device=device, dtype=dtype or weights_dtype)  # .to(dtype) leaves the integer vocabulary


def _check_draft_vocab(token_ids: Tensor, vocab_size: int, source: str) -> None:
    if token_ids.dtype != torch.long or token_ids.dim() != 1 or len(token_ids) == 0:
        raise AdapterError(f"{source}: draft_vocab must be a non-empty 1-D int64 tensor of token ids")
    if int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab_size:
        raise AdapterError(f"{source}: draft_vocab holds ids outside the target's vocabulary of {vocab_size}")
    if len(torch.unique(token_ids)) != len(token_ids):
        raise AdapterError(f"{source}: draft_vocab repeats token ids")
