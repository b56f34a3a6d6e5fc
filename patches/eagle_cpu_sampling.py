"""Sampled (not greedy) verification for SGLang's EAGLE-family workers on CPU: EAGLE, EAGLE3, STANDALONE and NGRAM.

Covers `sglang.srt.speculative.eagle_utils.eagle_sample` (SGLang 0.5.23), which every one of them verifies with. On
CPU, `_verify_uses_greedy` returns True whatever the temperature, so a temperature-1 request is silently decoded
greedily, and the sampling path's kernels are None there: `tree_speculative_sampling_target_only`
(`sglang/kernels/ops/speculative/verify_sampling.py`, CUDA only) and `top_k_renorm_prob` / `top_p_renorm_prob`
(`sglang/kernels/ops/sampling/renorm.py`). This patch binds the CPU shim's pure-torch versions of those three names
into `eagle_utils` and makes `_verify_uses_greedy` ignore `is_cpu`, so requests that are not all greedy take
SGLang's own sampling path: target-only tree speculative sampling, which keeps the target distribution exactly.

`--speculative-use-rejection-sampling` routes the same verify to a Triton kernel instead
(`chain_speculative_sampling_triton`), which cannot run without a GPU: a wrapper around the resolution step
`handle_speculative_decoding` (sglang/srt/arg_groups/speculative_hook.py) refuses the flag at start-up rather than let
SGLang decode those requests greedily. Only `flexdraft_sgl.sglang.cpu.install()` registers this module, i.e. on a
machine without a GPU whose `sgl_kernel` is the shim.
"""

from __future__ import annotations

from . import register, register_resolution

EAGLE_UTILS = "sglang.srt.speculative.eagle_utils"
KERNELS = ("tree_speculative_sampling_target_only", "top_k_renorm_prob", "top_p_renorm_prob")


def _around_verify_uses_greedy(original, **kwargs):
    return original(**{**kwargs, "is_cpu": False})


def _bind_kernels() -> None:
    """Set the three module globals that SGLang left None on CPU. Plain assignment, not a HookRegistry REPLACE:
    REPLACE would wrap None and then rebind every other module attribute that is None to the wrapper."""
    import importlib

    import sgl_kernel

    eagle_utils = importlib.import_module(EAGLE_UTILS)
    for name in KERNELS:
        if getattr(eagle_utils, name) is None:
            setattr(eagle_utils, name, getattr(sgl_kernel, name))


def _refuse_rejection_sampling(server_args, previous):
    from sglang.srt.arg_groups.overrides import resolved_view

    previous(server_args)
    if resolved_view(server_args).speculative_use_rejection_sampling:
        raise ValueError("--speculative-use-rejection-sampling needs SGLang's Triton kernels, which do not run without "
                         "a GPU; leave it out: on CPU EAGLE-family verification samples with target-only tree "
                         "speculative sampling, which keeps the target distribution")


def register_hooks() -> None:
    """Bind the kernels, register the hook (applied by `load_plugins`) and the start-up check; idempotent."""
    _bind_kernels()
    register(f"{EAGLE_UTILS}._verify_uses_greedy", _around_verify_uses_greedy, "AROUND")
    register_resolution("handle_speculative_decoding", _refuse_rejection_sampling)
