"""Give FLEXDRAFT an attention backend that honours its verify mask when the user names none.

Covers the resolution step `handle_attention_backend_compatibility` (sglang/srt/arg_groups/pipeline.py, SGLang
0.5.23), where `_attention_backend_default` (arg_groups/overrides.py) fills an unset `--attention-backend` with the
platform's choice (`get_default_attn_backend`, arg_groups/model_override_base.py: fa3 on Hopper and trtllm_mha on
Blackwell for topk-1 speculation; `handle_cpu_backends` has already put intel_amx on x86 CPUs). None of those runs
FLEXDRAFT's verify. A wrapper declares FLEXDRAFT's default first (`spec.mask_backends`: flashinfer on a GPU,
torch_native on CPU) when the algorithm is FLEXDRAFT, the user named no backend and the current one cannot verify;
a named backend stays, and `spec.check_server_args` refuses it if it cannot work. Runs in the process that resolves
the arguments (the launcher, or the process that builds `sglang.Engine`), which loads plugins before resolving.
"""

from __future__ import annotations

import logging

from . import register_resolution

logger = logging.getLogger(__name__)

STEP = "handle_attention_backend_compatibility"


def _default_mask_backend(server_args, previous):
    from sglang.srt.arg_groups.overrides import declare_resolution, resolving_view

    from ..sglang.spec import ALGORITHM, mask_backends

    cfg = resolving_view(server_args)
    named = (getattr(server_args, "_raw_input", None) or {}).get("attention_backend")
    allowed = mask_backends(cfg.device)
    flexdraft = (cfg.speculative_algorithm or "").upper() == ALGORITHM
    if flexdraft and named is None and cfg.attention_backend not in allowed:
        logger.info("FLEXDRAFT: attention backend %s (none named; its verify path needs one of %s)", allowed[0],
                    ", ".join(allowed))
        declare_resolution(server_args, "flexdraft_attention_backend_default", attention_backend=allowed[0])
    previous(server_args)


def register_hooks() -> None:
    register_resolution(STEP, _default_mask_backend)
