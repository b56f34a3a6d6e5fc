"""Runs real SGLang in subprocesses for tests: an `sglang.Engine` around a snippet of Python, or an HTTP server.

Subprocesses, because an Engine that fails to start SIGKILLs the process that created it. Both use the CPU-sized
configuration of the embedded default model (float32, torch_native attention, a small KV pool); the FlexDraft plugin
entry point gives every SGLang process the CPU support (`flexdraft_sgl.sglang.cpu.install()`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

from flexdraft_sgl.sglang.launch import SGLangServer, default_server_args

RESULT_MARKER = "@@SGLANG-HARNESS-RESULT@@"

CPU_ENGINE_ARGS = dict(device="cpu", attention_backend="torch_native", disable_cuda_graph=True, max_total_tokens=4096,
                       mem_fraction_static=0.3, dtype="float32", log_level="error")

# SGLang torch.compiles a few small helpers (rope, seeded sampling) on first use: about 5 s per process on these
# CPUs, for the same results.
TEST_ENV = {"TORCHDYNAMO_DISABLE": "1"}


def default_model_path() -> str:
    from flexdraft_sgl.default_model import prepare_default_model

    return str(prepare_default_model())


def chat_prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    """Token ids of one-turn chat prompts, ready for generation."""
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                               return_dict=True)["input_ids"]) for q in questions]


def engine_env(extra: dict | None = None) -> dict:
    """SGLANG_USE_CPU_ENGINE stays unset: install() sets it for SGLang's children, and with it set the Engine's own
    process would import sgl_kernel before loading plugins (see flexdraft_sgl.sglang.cpu.install)."""
    env = {k: v for k, v in os.environ.items() if k != "SGLANG_USE_CPU_ENGINE"}
    return env | TEST_ENV | (extra or {})


def run_with_engine(body: str, engine_args: dict | None = None, inputs=None, timeout: float = 400,
                    env: dict | None = None):
    """Start `engine = sglang.Engine(model_path=<default>, **CPU_ENGINE_ARGS, **engine_args)` in a fresh Python,
    run `body` (it reads `inputs` and assigns `result`), shut the engine down and return `result` (JSON-able)."""
    args = {"model_path": default_model_path(), **CPU_ENGINE_ARGS, **(engine_args or {})}
    script = "\n".join([
        "import json, sys",
        "import sglang",
        "inputs = json.loads(sys.stdin.read())",
        f"engine = sglang.Engine(**{args!r})",
        "try:",
        textwrap.indent(textwrap.dedent(body), "    "),
        "finally:",
        "    engine.shutdown()",
        f"print({RESULT_MARKER!r} + json.dumps(result), flush=True)",
    ])
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=engine_env(env), start_new_session=True)
    try:
        out, err = proc.communicate(json.dumps(inputs), timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the engine's scheduler and detokenizer too
        out, err = proc.communicate()
        raise TimeoutError(f"SGLang engine run exceeded {timeout:.0f} s:\n{err[-6000:]}") from None
    for line in out.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise RuntimeError(f"SGLang engine run failed (exit {proc.returncode}):\n{out[-3000:]}\n{err[-6000:]}")


def greedy_body(max_new_tokens: int, batched: bool) -> str:
    """An engine body: greedy output ids for `inputs` (token-id prompts), all in one batch or one at a time."""
    params = {"temperature": 0.0, "max_new_tokens": max_new_tokens}
    if batched:
        return f"result = [o['output_ids'] for o in engine.generate(input_ids=inputs, sampling_params={params!r})]"
    return f"result = [engine.generate(input_ids=p, sampling_params={params!r})['output_ids'] for p in inputs]"


def cpu_server(extra_args: list[str] | None = None, env: dict | None = None) -> SGLangServer:
    """`with cpu_server() as server:` runs `python -m sglang.launch_server` with the same settings as the Engine runs
    on a free port (see SGLangServer)."""
    args = default_server_args(default_model_path(), max_total_tokens=4096)
    return SGLangServer([*args, "--disable-cuda-graph", "--log-level", "error", *(extra_args or [])],
                        env=TEST_ENV | (env or {}))
