"""The Hugging Face reference engine: FlexDraft and plain decoding on one code path."""

from .engine import MODES, GenerationResult, KVCache, ReferenceEngine, RequestStats

__all__ = ["MODES", "GenerationResult", "KVCache", "ReferenceEngine", "RequestStats"]
