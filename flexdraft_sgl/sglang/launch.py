"""Starting and stopping `python -m sglang.launch_server` from Python, for the demo, the benchmarks and the tests."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def default_server_args(model_path: str, max_total_tokens: int = 8192) -> list[str]:
    """Arguments every configuration shares: on a machine without a GPU, SGLang's CPU engine with the torch_native
    attention backend in float32 (the only combination whose output is exactly the target's); on a GPU, FLEXDRAFT's
    own backend choice (`spec.mask_backends`) for every configuration, so plain and FLEXDRAFT runs compare the same
    attention kernels (SGLang alone would give plain decoding fa3 on Hopper)."""
    from .spec import mask_backends

    args = ["--model-path", str(model_path), "--max-total-tokens", str(max_total_tokens)]
    if not has_gpu():
        return args + ["--device", "cpu", "--attention-backend", mask_backends("cpu")[0], "--dtype", "float32",
                       "--mem-fraction-static", "0.3"]
    return args + ["--attention-backend", mask_backends("cuda")[0]]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two outputs differ (the shorter one's length if it is a prefix of the other),
    or None when they are identical: how far a FLEXDRAFT output agrees with plain decoding."""
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def flexdraft_args(adapter_path: str) -> list[str]:
    # --decode-log-interval 1: SGLang folds accept lengths into /server_info's average only when it logs a decode
    # step (every 40 by default), so short runs would report none.
    return ["--speculative-algorithm", "FLEXDRAFT", "--speculative-draft-model-path", str(adapter_path),
            "--decode-log-interval", "1"]


def server_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    if not has_gpu():
        env.setdefault("SGLANG_USE_CPU_ENGINE", "1")  # SGLang needs it for --device cpu
    env.update(extra or {})
    return env


def free_port(low: int = 15000, high: int = 21999) -> int:
    """A free local port below the kernel's ephemeral range and below SGLang's own picks (22000-29999). The server
    binds it only after ~20 s of start-up, and a port from bind(0) is ephemeral: meanwhile the kernel may hand it to
    any socket the start-up opens itself (CI lost a run to exactly that). Not SGLang's get_free_port_below_ephemeral:
    it falls back to an ephemeral port."""
    for port in random.sample(range(low, high + 1), 64):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port in {low}-{high}")


class SGLangServer:
    """`with SGLangServer(args) as server:` starts a server on a free local port, waits until it is healthy (or
    raises with the end of its log), and stops it and its children on exit."""

    LAUNCH_SERVER = (sys.executable, "-m", "sglang.launch_server")
    SERVE = (str(Path(sys.executable).with_name("sglang")), "serve")  # the `sglang serve` command

    PORT_TAKEN = "address already in use"  # uvicorn's bind error; the server then hangs instead of exiting
    START_ATTEMPTS = 3

    def __init__(self, args: list[str], env: dict | None = None, startup_timeout: float = 300.0,
                 launcher: tuple[str, ...] = LAUNCH_SERVER):
        self.command = [*launcher, *args, "--host", "127.0.0.1"]
        self.env = server_env(env)
        self.startup_timeout = startup_timeout
        self.log_path = Path(tempfile.mkstemp(prefix="sglang-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def __enter__(self) -> SGLangServer:
        for _ in range(self.START_ATTEMPTS):
            if self._start():
                return self
        raise RuntimeError(f"SGLang server found its port taken {self.START_ATTEMPTS} times:\n{self.log_tail()}")

    def _start(self) -> bool:
        """Start on a fresh port and wait until healthy; False when another process took the port first."""
        self.port = free_port()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([*self.command, "--port", str(self.port)], stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"SGLang server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            if self.PORT_TAKEN in self.log_tail().lower():
                self.__exit__(None, None, None)
                return False
            time.sleep(1.0)
        self.__exit__(None, None, None)
        raise TimeoutError(f"SGLang server not healthy after {self.startup_timeout:.0f} s:\n{self.log_tail()}")

    def __exit__(self, *exc) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def post(self, path: str, payload: dict, timeout: float = 600.0) -> dict | str | None:
        """The JSON reply (or its text, for the few endpoints that answer in words, e.g. /flush_cache)."""
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                body = r.read()
                if r.headers.get_content_type() != "application/json":
                    return body.decode(errors="replace")
                return json.loads(body) if body.strip() else None
        except urllib.error.HTTPError as e:  # keep the server's own explanation
            raise RuntimeError(f"POST {path} -> HTTP {e.code}: {e.read().decode(errors='replace')[:2000]}") from None

    def get(self, path: str, timeout: float = 60.0) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())
