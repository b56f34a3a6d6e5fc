"""Refuse a missing or broken FLEXDRAFT adapter with a message that says so, before SGLang reads it as a model.

Covers `sglang.srt.arg_groups.speculative_hook._resolve_speculative_algorithm_alias` (SGLang 0.5.23). Server-argument
resolution calls it with `--speculative-draft-model-path` before any algorithm hook runs, and it loads that path
with transformers' `AutoConfig`: a missing folder then fails as an unreachable model-hub download, and a folder
without `config.json` as "Unrecognized model". An AROUND hook checks the adapter folder first when the algorithm is
FLEXDRAFT; every other algorithm goes straight through.
"""

from __future__ import annotations

from . import register

TARGET = "sglang.srt.arg_groups.speculative_hook._resolve_speculative_algorithm_alias"


def _check_adapter_first(original, speculative_algorithm, speculative_draft_model_path, *args, **kwargs):
    from ..sglang.spec import ALGORITHM, FlexDraftSettings

    if (speculative_algorithm or "").upper() == ALGORITHM:
        FlexDraftSettings.resolve(speculative_draft_model_path, None)
    return original(speculative_algorithm, speculative_draft_model_path, *args, **kwargs)


def register_hooks() -> None:
    register(TARGET, _check_adapter_first, "AROUND")
