"""Float32 matmuls on CPU by whichever routine this machine runs fastest at the batch's row count.

Covers `sglang.srt.layers.quantization.unquant.UnquantizedLinearMethod.apply` (every unquantized linear layer) and
`sglang.srt.layers.logits_processor.LogitsProcessor._compute_lm_head` (the LM head), SGLang 0.5.23. On CPU both end in
`x @ W.T` (`F.linear` / `torch.matmul`), which MKL runs as a transposed GEMM, or a GEMV at one row. On the AMD EPYC
machines of this project that is the slowest of three ways to compute the same product. SmolLM2's layer shapes, the
weights streamed from memory, 2 threads, time relative to one row by `F.linear`:

    rows                          1     2     4     8     16    (32: 2.5, 64: 3.8 ms a layer by F.linear)
    "blas":    F.linear           1.0   1.56  1.37  1.17  1.6
    "by_rows": W @ x.T            0.39  0.37  0.59  0.91  1.27  (one row padded to two)
    "packed":  oneDNN, prepacked  0.56  0.67  0.59  0.69  0.73  (0.65x F.linear at 32 and 64 rows)

Which routine wins depends on the CPU and its BLAS, so it is measured, not assumed (`FLEXDRAFT_CPU_LINEAR=auto`, the
default): the three are timed on 256 MiB of weights of the model's width (streamed from memory, as a real model's
are) for each row-count bucket of `BUCKETS`; a bucket serves the row counts up to it (the last, all above) and keeps
F.linear unless another routine is at least `MIN_GAIN` faster. The choice is measured once per machine (CPU model,
torch version, thread count, width) and kept in `~/.cache/flexdraft/cpu-linear/`, so that every SGLang server of a
benchmark runs the same routines; delete the file to measure again. `off` keeps SGLang's own path; `by_rows` or
`packed` forces one routine. "packed" holds a oneDNN copy of each weight it runs (one more copy of the linear weights
in memory), made at first use and remade if the weight is written to.

Both hooks leave every other case to SGLang untouched: tensors off the CPU, other dtypes, gradients, the AMX kernels,
quantized or LoRA heads. The FlexDraft plugin installs them in every SGLang process on a machine without a GPU, plain
decoding included, so that a speed-up over plain SGLang is never measured against a slower matmul than FLEXDRAFT's.
Numerically it is the same product summed in another order (float32 rounding differences only).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import register

logger = logging.getLogger(__name__)

LINEAR_METHOD = "sglang.srt.layers.quantization.unquant.UnquantizedLinearMethod"
LOGITS_PROCESSOR = "sglang.srt.layers.logits_processor.LogitsProcessor"
ENV = "FLEXDRAFT_CPU_LINEAR"
BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 128)
MAX_PROBE_PAIRS = 32
MIN_GAIN = 0.9  # another routine replaces F.linear for a bucket only when it takes at most this fraction of its time


def by_weight_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` for 2-D x as `(weight @ x.T).T`; a single row is padded to two (faster, see above)."""
    m = x.shape[0]
    if m == 1:
        x = torch.cat([x, x])
    out = torch.mm(weight, x.t()).t()[:m]
    return out if bias is None else out + bias


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` for 2-D x with the weight from `pack` (oneDNN, as torch.compile's CPU freezing runs linears)."""
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


def _packed_weight(owner, weight: torch.Tensor) -> torch.Tensor:
    """`pack(weight)`, kept on `owner` until the weight is written to (its version counter moves)."""
    cached = getattr(owner, "_flexdraft_packed", None)
    if cached is None or cached[0] is not weight or cached[1] != weight._version:
        cached = (weight, weight._version, pack(weight))
        owner._flexdraft_packed = cached
    return cached[2]


def _run(routine: str, x2: torch.Tensor, weight, bias, owner) -> torch.Tensor:
    if routine == "by_rows":
        return by_weight_rows(x2, weight, bias)
    if routine == "packed":
        return packed_linear(x2, _packed_weight(owner, weight), bias)
    return F.linear(x2, weight, bias)


def probe_pairs(width: int, budget_bytes: int = 256 << 20) -> int:
    """How many [3w, w] + [w, 3w] weight pairs the probe streams: the budget's worth, 1 to MAX_PROBE_PAIRS."""
    return max(1, min(MAX_PROBE_PAIRS, budget_bytes // (2 * 3 * width * width * 4)))


def measure_choice(width: int, buckets=BUCKETS, repeats: int = 3, budget_bytes: int = 256 << 20) -> dict[int, str]:
    """For each bucket (a row count), the routine to run on this machine. Weights of shape [3w, w] and [w, 3w], enough
    copies (256 MiB, at most MAX_PROBE_PAIRS pairs: a tiny model's weights stay in cache anyway) to stream from memory
    as a real model's do; the routines alternate so that a busy spell of the machine falls on all of them. A few
    seconds on an idle 2-core machine."""
    layers = [(torch.nn.Module(), torch.randn(3 * width, width)) for _ in range(probe_pairs(width, budget_bytes))]
    layers += [(torch.nn.Module(), torch.randn(width, 3 * width)) for _ in range(len(layers))]
    routines = ["blas", "by_rows"]
    try:
        packed_linear(torch.randn(2, width), pack(layers[0][1]), None)
        routines.append("packed")
    except (RuntimeError, AttributeError) as e:  # a torch built without oneDNN
        logger.info("oneDNN linear unavailable (%s)", e)

    def seconds(routine, x, wide):
        start = time.perf_counter()
        for owner, weight in layers:
            _run(routine, x if weight.shape[1] == width else wide, weight, None, owner)
        return time.perf_counter() - start

    choice = {}
    for m in buckets:
        x, wide = torch.randn(m, width), torch.randn(m, 3 * width)
        for routine in routines:  # first use: packing, warm-up
            seconds(routine, x, wide)
        best = {r: float("inf") for r in routines}
        for _ in range(repeats):
            for routine in routines:
                best[routine] = min(best[routine], seconds(routine, x, wide))
        fastest = min(routines, key=best.get)
        choice[m] = fastest if best[fastest] <= MIN_GAIN * best["blas"] else "blas"
    return choice


def _choice_file(width: int) -> Path:
    from ..default_model import cache_root

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), "unknown")
    key = json.dumps([cpu, torch.__version__, torch.get_num_threads(), width, BUCKETS])
    return cache_root() / "cpu-linear" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def machine_choice(width: int) -> dict[int, str]:
    """This machine's choice: from its file when one was measured before, else measured now and written."""
    path = _choice_file(width)
    try:
        return {int(m): r for m, r in json.loads(path.read_text())["choice"].items()}
    except (OSError, ValueError, KeyError):
        pass
    choice = measure_choice(width)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"width": width, "threads": torch.get_num_threads(), "choice": choice}))
        tmp.replace(path)
    except OSError as e:  # a read-only cache: every process measures for itself
        logger.warning("could not keep the CPU matmul choice in %s: %s", path, e)
    return choice


_choice: dict[int, str] | None = None  # bucket -> routine, once chosen in this process


def routine_for(rows: int, width: int) -> str:
    """The routine this process runs for `rows` rows (this machine's measured choice when FLEXDRAFT_CPU_LINEAR=auto)."""
    global _choice
    if _choice is None:
        mode = os.environ.get(ENV, "auto")
        if mode not in ("auto", "off", "by_rows", "packed"):
            raise ValueError(f"{ENV}={mode!r}: expected auto, off, by_rows or packed")
        _choice = machine_choice(width) if mode == "auto" else {m: "blas" if mode == "off" else mode for m in BUCKETS}
        logger.info("%s=%s: CPU float32 matmul routine by rows %s", ENV, mode, _choice)
    bucket = next((m for m in BUCKETS if m >= rows), BUCKETS[-1])
    return _choice[bucket]


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and weight.dim() == 2
            and x.numel() > 0 and not (x.requires_grad or weight.requires_grad))


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, owner=None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` by this machine's fastest routine for x's row count, where `applies`; `owner` (the
    layer) keeps the packed copy of the weight."""
    if not applies(x, weight):
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    routine = routine_for(x2.shape[0], x.shape[-1])
    if routine == "blas":
        return F.linear(x, weight, bias)
    out = _run(routine, x2, weight, bias, owner if owner is not None else weight)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def _around_linear_apply(original, method, layer, x, bias=None):
    from sglang.srt.utils.common import use_intel_amx_backend

    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or use_intel_amx_backend(layer) or not applies(x, weight):
        return original(method, layer, x, bias)
    return cpu_linear(x, weight, bias, owner=layer)


def _around_compute_lm_head(original, processor, hidden_states, lm_head, embedding_bias=None, *, out=None):
    from sglang.srt.layers.logits_processor import should_apply_lm_head_quant_method
    from sglang.srt.utils.common import use_intel_amx_backend

    weight = getattr(lm_head, "weight", None)
    plain_head = (isinstance(weight, torch.Tensor) and not hasattr(lm_head, "set_lora")
                  and not should_apply_lm_head_quant_method(lm_head, getattr(lm_head, "quant_method", None))
                  and not processor.use_fp32_lm_head and processor.rl_on_policy_target is None
                  and not use_intel_amx_backend(lm_head))
    if not plain_head or not applies(hidden_states, weight):
        return original(processor, hidden_states, lm_head, embedding_bias, out=out)
    return cpu_linear(hidden_states, weight, owner=lm_head)


def register_hooks() -> None:
    """Register both hooks with SGLang's HookRegistry (applied by `load_plugins`); idempotent."""
    register(f"{LINEAR_METHOD}.apply", _around_linear_apply, "AROUND")
    register(f"{LOGITS_PROCESSOR}._compute_lm_head", _around_compute_lm_head, "AROUND")
