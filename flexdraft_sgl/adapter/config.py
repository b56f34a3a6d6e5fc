"""What an adapter was trained for, and the check that refuses it on any other target.

An adapter is only meaningful on the exact target it was trained against: its projectors are shaped by the target's
attention, its calibration MLP by the vocabulary, and its mask layout by the decoding code. The JSON config names all
of that, plus a fingerprint, and `AdapterConfig.check_target` names the first field that differs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

ADAPTER_FORMAT = "flexdraft-adapter/1"
# Mask row j of a block anchored after the token at position p sits at position p+1+j and enters the split layer with
# its own mask embedding; row 0 is the next bonus slot, rows 1..B-1 draft the tokens after it. Changing this breaks
# every trained adapter, hence the version (v1 had one mask embedding shared by all rows).
MASK_LAYOUT = "anchor-after/row0-bonus-slot/row-embeddings/v2"
# How calibration reads its inputs and where its correction goes (`adapter.modules.CalibrationMLP`).
CALIBRATION_FORMS = ("logits", "hidden")
CALIBRATION_INPUTS = ("unit-rms", "raw")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class AdapterError(ValueError):
    """An adapter that cannot be used: missing files, bad config, or a different target."""


class UnsupportedTargetError(ValueError):
    pass


@dataclass(frozen=True)
class TargetSpec:
    """The architecture facts an adapter depends on."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    qk_norm: bool
    attention_bias: bool

    @classmethod
    def from_hf_config(cls, config) -> TargetSpec:
        """From a transformers config (Hugging Face and SGLang both load these)."""
        archs = getattr(config, "architectures", None) or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedTargetError(
                f"target architecture {archs or config.model_type!r} is not supported; "
                f"FlexDraft supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(config, "use_sliding_window", False):
            raise UnsupportedTargetError("targets with sliding-window attention are not supported")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            architecture=arch,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            qk_norm=arch == "Qwen3ForCausalLM",
            attention_bias=arch == "Qwen2ForCausalLM" or bool(getattr(config, "attention_bias", False)),
        )


def vocab_digest(tokenizer) -> str:
    """sha256 of the tokenizer's token -> id map: two targets with equal shapes but different vocabularies differ."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


def fingerprint(spec: TargetSpec, vocab: str | None) -> str:
    payload = json.dumps({"target": asdict(spec), "vocab": vocab, "mask_layout": MASK_LAYOUT}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AdapterConfig:
    target: TargetSpec
    tuned_depth: int  # N: the final N layers get tuned projectors for mask rows
    block_size: int  # B: mask rows per block; drafts per step are at most B-1
    calibration_rank: int  # r: hidden width of the calibration MLP
    calibration_form: str = "logits"  # its correction: added to the logits, or to the hidden state before the head
    calibration_input: str = "unit-rms"  # its inputs scaled to unit RMS, or raw
    draft_vocab_size: int = 0  # V': drafts come from these most frequent tokens alone (0: the whole vocabulary)
    target_name: str = ""  # informational: the model path or name it was trained on
    vocab_digest: str | None = None
    verify_rule: str = "cumulative_product"
    verify_threshold: float = 0.01
    trained: bool = False
    format: str = ADAPTER_FORMAT
    mask_layout: str = MASK_LAYOUT

    def __post_init__(self):
        if not 1 <= self.tuned_depth <= self.target.num_layers:
            raise AdapterError(
                f"tuned_depth must be between 1 and the target's {self.target.num_layers} layers, "
                f"got {self.tuned_depth}"
            )
        if self.block_size < 2:
            raise AdapterError(f"block_size must be at least 2 (one bonus slot and one draft), got {self.block_size}")
        if self.calibration_rank < 1:
            raise AdapterError(f"calibration_rank must be positive, got {self.calibration_rank}")
        if self.calibration_form not in CALIBRATION_FORMS:
            raise AdapterError(f"calibration_form must be one of {CALIBRATION_FORMS}, got {self.calibration_form!r}")
        if self.calibration_input not in CALIBRATION_INPUTS:
            raise AdapterError(f"calibration_input must be one of {CALIBRATION_INPUTS}, got {self.calibration_input!r}")
        if not 0 <= self.draft_vocab_size <= self.target.vocab_size:
            raise AdapterError(f"draft_vocab_size must be between 0 (the whole vocabulary) and the target's "
                               f"{self.target.vocab_size}, got {self.draft_vocab_size}")
        if self.draft_vocab_size and self.calibration_form != "hidden":
            # A logits-form calibration corrects every token's logit (r x V), so drafting from fewer saves nothing.
            raise AdapterError("a draft vocabulary needs a hidden-form calibration (calibration_form 'hidden')")

    @property
    def split_layer(self) -> int:
        return self.target.num_layers - self.tuned_depth

    @property
    def draft_head_fraction(self) -> float:
        """The part of the LM head a draft row reads: its draft vocabulary's share of the target's."""
        return self.draft_vocab_size / self.target.vocab_size if self.draft_vocab_size else 1.0

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.target, self.vocab_digest)

    def check_target(self, spec: TargetSpec, vocab: str | None = None) -> None:
        """Raise AdapterError naming every field where `spec` differs from the target this adapter was built for."""
        diffs = [
            f"{f.name}: adapter {getattr(self.target, f.name)!r}, target {getattr(spec, f.name)!r}"
            for f in fields(TargetSpec)
            if getattr(self.target, f.name) != getattr(spec, f.name)
        ]
        if vocab is not None and self.vocab_digest is not None and vocab != self.vocab_digest:
            diffs.append("vocabulary: the target's tokenizer differs from the one the adapter was trained with")
        if diffs:
            name = f" ({self.target_name})" if self.target_name else ""
            raise AdapterError(
                f"this FlexDraft adapter was built for a different target{name}: " + "; ".join(diffs)
            )

    def to_json(self) -> str:
        data = asdict(self)
        data["fingerprint"] = self.fingerprint
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "adapter config") -> AdapterConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise AdapterError(f"{source} is not valid JSON: {e}") from None
        if data.get("format") != ADAPTER_FORMAT:
            raise AdapterError(f"{source} has format {data.get('format')!r}; this version reads {ADAPTER_FORMAT!r}")
        if data.get("mask_layout") != MASK_LAYOUT:
            raise AdapterError(
                f"{source} uses mask layout {data.get('mask_layout')!r}; this version decodes {MASK_LAYOUT!r}"
            )
        stored = data.pop("fingerprint", None)
        try:
            config = cls(**{**data, "target": TargetSpec(**data["target"])})
        except (TypeError, KeyError) as e:
            raise AdapterError(f"{source} is malformed: {e}") from None
        if stored is not None and stored != config.fingerprint:
            raise AdapterError(f"{source} fingerprint {stored} does not match its own contents (edited by hand?)")
        return config
