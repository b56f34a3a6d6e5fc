"""Step profile: wall time of one FLEXDRAFT step in SGLang broken into its parts, for `eval/step_profile.py`.

Enabled by FLEXDRAFT_PROFILE=/path/file.jsonl (read once, when the worker starts); then every decode step appends one
JSON line {"mode", "bs", "width", "sections": {name: seconds}, "total": seconds, "start": seconds}. Sections nest, and
a nested one is named after its parents ("verify/forward/attn_metadata"); each section's seconds exclude its children
and whatever a step spends outside every section is "other", so the sections of a line add up to its total. "start"
(the step's first clock reading) spaces consecutive steps: what lies between them beyond a step's total is the
scheduler's own work, outside the worker call. On a GPU the clock is read after a device synchronisation, so a section
holds the device work it queued. Unset, the worker gets `OFF`, whose sections are one shared no-op context manager:
nothing is timed or synchronised.

With the variable set, plain SGLang's decode steps are timed too, at the same boundary (the model worker call the
scheduler makes for one batch: FLEXDRAFT's `forward_batch_generation`, plain SGLang's `TpModelWorker` one), as lines
of mode "plain-sglang", so both come from the same timer in the same process layout.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

ENV = "FLEXDRAFT_PROFILE"


class StepProfile:
    def __init__(self, path: str | Path, synchronize=None, clock=time.perf_counter):
        self.path, self.synchronize, self.clock = Path(path), synchronize, clock
        self._stack: list[str] | None = None  # open sections while a step runs; None between steps
        self._seconds: dict[str, float] = {}
        self._meta: dict = {}
        self._last = 0.0

    def _now(self) -> float:
        if self.synchronize is not None:
            self.synchronize()
        return self.clock()

    def _charge(self) -> None:
        """The time since the last boundary goes to the innermost open section."""
        now = self._now()
        name = "/".join(self._stack) or "other"
        self._seconds[name] = self._seconds.get(name, 0.0) + now - self._last
        self._last = now

    @contextmanager
    def step(self, **meta):
        self._stack, self._seconds, self._meta = [], {}, dict(meta)
        start = self._last = self._now()
        try:
            yield
            self._charge()
        finally:
            self._stack = None
        line = {**self._meta, "sections": self._seconds, "total": self._last - start, "start": start}
        with open(self.path, "a") as f:  # after the clock stopped: the write is no part of the step
            f.write(json.dumps(line) + "\n")

    def note(self, **meta) -> None:
        """Facts known only inside the step (its mode, its width)."""
        self._meta.update(meta)

    @contextmanager
    def section(self, name: str):
        if self._stack is None:  # outside a step (prefill, start-up): untimed
            yield
            return
        self._charge()
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge()
            self._stack.pop()

    def wrap(self, obj, attr: str, name: str) -> None:
        """Time every call of `obj.attr` as section `name` (an instance attribute shadowing the method), for code
        the worker calls through SGLang or must not edit."""
        method = getattr(obj, attr)

        def timed(*args, **kwargs):
            with self.section(name):
                return method(*args, **kwargs)

        setattr(obj, attr, timed)


class _Off:
    """Profiling disabled: every section is the same no-op context manager."""

    _null = nullcontext()

    def step(self, **meta):
        return self._null

    def section(self, name: str):
        return self._null

    def note(self, **meta) -> None:
        pass

    def wrap(self, obj, attr: str, name: str) -> None:
        pass


OFF = _Off()


def step_profile(device) -> StepProfile | _Off:
    """The worker's profile: FLEXDRAFT_PROFILE's file, or OFF."""
    path = os.environ.get(ENV)
    if not path:
        return OFF
    import torch

    return StepProfile(path, torch.cuda.synchronize if str(device).startswith("cuda") else None)


_plain: StepProfile | None = None


def _plain_decode_step(original, worker, batch=None, *args, **kwargs):
    """Around `TpModelWorker.forward_batch_generation`: a decode batch handed over by the scheduler is a plain SGLang
    step (FLEXDRAFT's own forwards come with batch=None or as prefill)."""
    if batch is None or not batch.forward_mode.is_decode():
        return original(worker, batch, *args, **kwargs)
    global _plain
    if _plain is None:
        _plain = step_profile(worker.model_runner.device)
    with _plain.step(mode="plain-sglang", bs=len(batch.seq_lens), width=1), _plain.section("forward"):
        return original(worker, batch, *args, **kwargs)


def register_hooks() -> None:
    """Time plain SGLang's decode steps, only while FLEXDRAFT_PROFILE is set (called in every SGLang process)."""
    if os.environ.get(ENV):
        from ..patches import register

        register("sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation", _plain_decode_step, "AROUND")
