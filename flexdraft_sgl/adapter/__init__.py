"""The trained part of FlexDraft: config, validation against a target, modules, safetensors I/O."""

from .config import (
    ADAPTER_FORMAT, MASK_LAYOUT, SUPPORTED_ARCHITECTURES, AdapterConfig, AdapterError, TargetSpec,
    UnsupportedTargetError, vocab_digest,
)
from .modules import CONFIG_FILE, TARGET_CONFIG_FILE, WEIGHTS_FILE, CalibrationMLP, FlexDraftAdapter, TunedAttention

__all__ = [
    "ADAPTER_FORMAT", "MASK_LAYOUT", "SUPPORTED_ARCHITECTURES", "AdapterConfig", "AdapterError", "TargetSpec",
    "UnsupportedTargetError", "vocab_digest", "CONFIG_FILE", "TARGET_CONFIG_FILE", "WEIGHTS_FILE", "CalibrationMLP",
    "FlexDraftAdapter", "TunedAttention",
]
