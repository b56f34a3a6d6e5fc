"""EAGLE-3 draft heads for the targets this project serves, in the checkpoint layout SGLang loads."""

from .checkpoint import save_random_eagle3

__all__ = ["save_random_eagle3"]
