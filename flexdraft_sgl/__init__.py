"""FlexDraft for SGLang: lossless self-speculative decoding (see README.md)."""

__version__ = "0.1.0"
