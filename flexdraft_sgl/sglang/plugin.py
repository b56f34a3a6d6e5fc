"""The `sglang.srt.plugins` entry point. SGLang's `load_plugins()` runs it in every process it starts (main,
scheduler, detokenizer), so FLEXDRAFT is known wherever the scheduler resolves `--speculative-algorithm`."""

from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from ..patches import adapter_preflight, attention_backend_default, unsupported_requests, verify_graph_input
    from . import cpu
    from .spec import register_algorithm

    cpu.install()  # no-op on a machine with a GPU or a real sgl_kernel
    adapter_preflight.register_hooks()
    attention_backend_default.register_hooks()
    unsupported_requests.register_hooks()
    verify_graph_input.register_hooks()
    register_algorithm()
    _registered = True
