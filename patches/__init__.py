"""Runtime patches to SGLang 0.5.23, applied through its plugin HookRegistry and resolution hooks (importable as
flexdraft_sgl.patches). Each module covers one gap and names the SGLang code it hooks; `register` and
`register_resolution` keep every hook registered once per process, however often the plugin entry point runs."""

from __future__ import annotations

_registered: set[str] = set()


def register(target: str, hook, hook_type: str) -> None:
    """HookRegistry.register(target, hook, HookType[hook_type]) unless this target already has our hook."""
    if target in _registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(target, hook, HookType[hook_type])
    _registered.add(target)


def register_resolution(step: str, wrapper) -> None:
    """`wrapper(server_args, previous)` around the server-argument resolution step `step`
    (sglang/srt/arg_groups/resolution_hooks.py `register_resolution_hook`), unless already registered."""
    if f"resolution:{step}" in _registered:
        return
    from sglang.srt.arg_groups.resolution_hooks import register_resolution_hook

    register_resolution_hook(step)(wrapper)
    _registered.add(f"resolution:{step}")
