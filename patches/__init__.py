"""Runtime patches to SGLang 0.5.23, applied through its plugin HookRegistry (importable as flexdraft_sgl.patches)."""
