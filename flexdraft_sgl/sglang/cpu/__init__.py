"""What SGLang 0.5.23 needs to run speculative decoding on a machine without a GPU.

`install()` is called first thing by the FlexDraft plugin entry point, which SGLang's `load_plugins()` runs in every
process it starts (main, scheduler, detokenizer; the last two are multiprocessing *spawn* children).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

SHIM_DIR = Path(__file__).resolve().parent / "sgl_kernel_shim"


def _real_sgl_kernel() -> bool:
    """True when an `sgl_kernel` other than the shim imports. A CUDA-only build (the `sglang-kernel` wheel) is found
    on a CPU machine too but fails to import without libcuda: that one does not count, and is dropped again."""
    spec = importlib.util.find_spec("sgl_kernel")
    if spec is None or (spec.origin and Path(spec.origin).resolve().is_relative_to(SHIM_DIR)):
        return False
    try:
        import sgl_kernel  # noqa: F401
        return True
    except Exception as e:  # OSError or ImportError from the CUDA libraries
        logger.warning("sgl_kernel at %s does not import on this machine (%s); using the CPU shim", spec.origin, e)
        for name in [m for m in sys.modules if m == "sgl_kernel" or m.startswith("sgl_kernel.")]:
            del sys.modules[name]
        return False


def _prepend_path(entry: str) -> None:
    if sys.path[:1] != [entry]:  # first, even if scripts/setup.sh's .pth file already put it last
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if entry not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([entry, *parts])


def install() -> bool:
    """Make SGLang's CPU speculative paths work in this process and in every process it starts; idempotent.

    Does nothing at all (returns False) when a CUDA GPU is available or a real `sgl_kernel` imports. Otherwise:

    - puts `SHIM_DIR` (a pure-torch `sgl_kernel`, see its docstring) first on `sys.path` and on `PYTHONPATH`. Spawned
      children receive the parent's `sys.path` before they unpickle anything, and any other subprocess inherits
      `PYTHONPATH`. That matters because a child imports `sgl_kernel` while importing
      `sglang.srt.managers.scheduler`, before its own `load_plugins()` runs;
    - sets `SGLANG_USE_CPU_ENGINE=1` when it is unset: `--device cpu` needs it (model construction fails without it)
      and on a machine without a GPU there is no other device. Processes started afterwards see it; modules this
      process imported before install() keep their CPU checks, which is harmless where no model runs (the main
      process). An explicit value, such as 0, is respected;
    - leaves `SGLANG_NATIVE_MOVE_KV_CACHE` alone: the shim's `copy_all_layer_kv_cache_cpu` does the same row copy;
    - runs float32 matmuls (linear layers, LM head) by the routine this machine runs fastest at the batch's row count
      (`flexdraft_sgl.patches.cpu_linear`), in plain decoding as much as in speculative steps;
    - registers the TARGET_VERIFY hooks on the torch_native attention backend (`flexdraft_sgl.patches.
      torch_native_verify`), the EAGLE draft backends for it (`eagle_torch_native_draft`) and sampled EAGLE-family
      verification (`eagle_cpu_sampling`), which `load_plugins()` applies after the plugins ran.

    One case is beyond any plugin: with `SGLANG_USE_CPU_ENGINE=1` already set when a script imports
    `sglang.srt.entrypoints.engine` (which `sglang.Engine(...)` does before it loads plugins), SGLang imports
    `sgl_kernel` first. Leave the variable unset, or put `SHIM_DIR` on the path before Python starts: PYTHONPATH, or
    a `.pth` file in site-packages naming it (appended after site-packages, so it never shadows a real
    `sgl_kernel`). `python -m sglang.launch_server` loads plugins before that import and is not affected.
    """
    import torch

    if torch.cuda.is_available() or _real_sgl_kernel():
        return False
    _prepend_path(str(SHIM_DIR))
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

    from ...patches import cpu_linear, eagle_cpu_sampling, eagle_torch_native_draft, torch_native_verify

    cpu_linear.register_hooks()
    torch_native_verify.register_hooks()
    eagle_torch_native_draft.register_hooks()
    eagle_cpu_sampling.register_hooks()
    return True
