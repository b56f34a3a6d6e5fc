"""EAGLE-3 draft heads for the targets this project serves, in the checkpoint layout SGLang loads, and their training
(`flexdraft train-eagle3`, `train.py`)."""

from .checkpoint import save_random_eagle3
from .model import Eagle3Draft

__all__ = ["Eagle3Draft", "save_random_eagle3"]
