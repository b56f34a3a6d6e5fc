"""Runtime patches to SGLang 0.5.23, applied through its plugin HookRegistry (importable as flexdraft_sgl.patches).
Each module covers one gap and names the SGLang code it hooks; `register` keeps every hook registered once per
process, however often the plugin entry point runs."""

from __future__ import annotations

_registered: set[str] = set()


def register(target: str, hook, hook_type: str) -> None:
    """HookRegistry.register(target, hook, HookType[hook_type]) unless this target already has our hook."""
    if target in _registered:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(target, hook, HookType[hook_type])
    _registered.add(target)
