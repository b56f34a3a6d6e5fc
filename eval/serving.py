"""`flexdraft eval`: FLEXDRAFT against plain decoding and SGLang's own speculative algorithms, each served by SGLang.

One fresh server per configuration, started with the same arguments apart from the speculative ones. Against it, an
async client sends each dataset's prompts (chat-templated token ids, `/generate`, streamed) at every concurrency and
temperature, at most `concurrency` requests in flight, after flushing the radix cache so that no point reads another
point's prefill. Each point records output tokens per second (all output tokens over the wall time of the point), mean
TPOT ((latency - time to first token) / (tokens - 1)), mean TTFT, the accept length (output tokens per verify step, as
SGLang reports it) and every request's output ids.

Each fresh server first answers a few unmeasured warm-up requests (`warm_up`). Points are appended to
`results.jsonl` as they finish; a rerun skips the points already there, so an interrupted run resumes where it stopped
(a configuration whose points are all present starts no server). With `rounds` > 1 every configuration is measured
that many times, round after round, each time by a fresh server, and the report quotes each point's median
(`combine_rounds`). The report compares each point with plain decoding's point of the same run: speed-up in tokens
per second, and greedy equality (temperature 0: the fraction of requests whose output ids equal plain decoding's).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

RESULTS = "results.jsonl"
CONCURRENCY = (1, 2, 4, 8, 16, 32, 64)
TEMPERATURES = (0.0, 1.0)


@dataclass(frozen=True)
class ServeConfig:
    """One server configuration: the speculative arguments and environment added to the shared arguments."""

    name: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()


def serve_configs(adapter: str, *, cost_table: str | None = None, ngram_width: int = 8,
                  eagle3_draft: str | None = None, dflash_draft: str | None = None) -> dict[str, ServeConfig]:
    """Every configuration this machine can run: plain, FLEXDRAFT's three modes and NGRAM always; EAGLE3 and DFLASH
    when a draft model is given (they need a GPU)."""
    from flexdraft_sgl.sglang.launch import flexdraft_args

    flex = tuple(flexdraft_args(adapter))
    table = (("FLEXDRAFT_COST_TABLE", cost_table),) if cost_table else ()
    configs = [
        ServeConfig("plain"),
        # Plain decoding without overlap scheduling, as every speculative worker on CPU runs: speed-ups are quoted
        # against the faster of the two (report.speedup), so none is measured against a handicapped baseline.
        ServeConfig("plain-sync", ("--disable-overlap-schedule",)),
        ServeConfig("flexdraft-parallel", flex, (("FLEXDRAFT_MODE", "parallel"),)),
        ServeConfig("flexdraft-sequential", flex, (("FLEXDRAFT_MODE", "sequential"),)),
        ServeConfig("flexdraft-flex", flex, (("FLEXDRAFT_MODE", "flex"),) + table),
        ServeConfig("ngram", ("--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", str(ngram_width),
                              "--decode-log-interval", "1")),
    ]
    if eagle3_draft:
        configs.append(ServeConfig("eagle3", ("--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path",
                                              eagle3_draft, "--speculative-num-steps", "3",
                                              "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4")))
    if dflash_draft:
        configs.append(ServeConfig("dflash", ("--speculative-algorithm", "DFLASH", "--speculative-draft-model-path",
                                              dflash_draft)))
    return {c.name: c for c in configs}


# ---- prompts -------------------------------------------------------------------------------------------------------
def dataset_prompts(name: str, count: int) -> list[str]:
    """The first `count` prompts of an evaluation set: mt-bench, humaneval or sharegpt (held out from training)."""
    from .datasets import DATASETS

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return DATASETS[name]()[:count]


# ---- the client ----------------------------------------------------------------------------------------------------
@dataclass
class Point:
    """One measured point: a configuration, a dataset, a temperature and a concurrency."""

    config: str
    dataset: str
    temperature: float
    concurrency: int
    tokens_per_second: float = 0.0
    tpot_ms: float = 0.0
    ttft_ms: float = 0.0
    accept_length: float | None = None
    requests: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    outputs: list[list[int]] = field(default_factory=list)
    round: int = 0  # which pass over every configuration measured it (EvalPlan.rounds)
    rounds: int = 1  # after `combine_rounds`: how many measurements the figures are the median of
    spread: float = 0.0  # after `combine_rounds`: (max - min) / median of tokens/s across them

    @property
    def key(self) -> tuple:
        """The point measured: configuration, dataset, temperature, concurrency (the same in every round)."""
        return (self.config, self.dataset, float(self.temperature), int(self.concurrency))


def combine_rounds(points: list[Point]) -> list[Point]:
    """One point per key from the rounds that measured it: the median tokens/s, TPOT and TTFT (the median of one or
    two rounds is their mean), the accept length over all their tokens and steps, and every round's outputs in round
    order (so greedy equality compares each round's outputs with the same round of plain decoding)."""
    by_key: dict[tuple, list[Point]] = {}
    for p in sorted(points, key=lambda p: p.round):
        by_key.setdefault(p.key, []).append(p)
    combined = []
    for same in by_key.values():
        rates = [p.tokens_per_second for p in same]
        middle = statistics.median(rates)
        steps = [p.output_tokens / p.accept_length for p in same if p.accept_length]
        combined.append(replace(
            same[0], tokens_per_second=round(middle, 3),
            tpot_ms=round(statistics.median(p.tpot_ms for p in same), 3),
            ttft_ms=round(statistics.median(p.ttft_ms for p in same), 3),
            accept_length=round(sum(p.output_tokens for p in same if p.accept_length) / sum(steps), 4) if steps
            else None,
            requests=sum(p.requests for p in same), output_tokens=sum(p.output_tokens for p in same),
            seconds=round(sum(p.seconds for p in same), 4), outputs=[o for p in same for o in p.outputs],
            round=0, rounds=len(same), spread=round((max(rates) - min(rates)) / middle, 4) if middle else 0.0))
    return combined


async def _request(session, url: str, ids: list[int], params: dict) -> dict:
    started = time.perf_counter()
    first, last = None, None
    async with session.post(f"{url}/generate", json={"input_ids": ids, "sampling_params": params,
                                                      "stream": True}) as reply:
        if reply.status != 200:
            raise RuntimeError(f"/generate answered {reply.status}: {(await reply.text())[:500]}")
        async for line in reply.content:
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            if first is None:
                first = time.perf_counter()
            last = json.loads(line[5:])  # each chunk carries the whole output so far
    ended = time.perf_counter()
    if last is None:
        raise RuntimeError("/generate streamed no output")
    tokens = len(last["output_ids"])
    return {"output_ids": last["output_ids"], "latency": ended - started, "ttft": (first or ended) - started,
            "tokens": tokens, "verify_steps": last["meta_info"].get("spec_verify_ct", 0)}


async def _drive(url: str, prompts: list[list[int]], concurrency: int, params: dict) -> tuple[list[dict], float]:
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=1800)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def one(ids):
            async with gate:
                return await _request(session, url, ids, params)

        started = time.perf_counter()
        results = await asyncio.gather(*(one(ids) for ids in prompts))
        return list(results), time.perf_counter() - started


def _flush_cache(server, attempts: int = 20) -> None:
    """Empty the radix cache; SGLang refuses while requests of the previous point are still being torn down."""
    for _ in range(attempts):
        try:
            server.post("/flush_cache", {})
            return
        except RuntimeError:
            time.sleep(0.5)
    raise RuntimeError(f"the server kept refusing /flush_cache for {attempts / 2:.0f} s")


def measure_point(server, point: Point, prompts: list[list[int]], max_new_tokens: int, seed: int = 0) -> Point:
    """Run one point against a live server (radix cache flushed first) and fill in its figures."""
    _flush_cache(server)
    params = {"max_new_tokens": max_new_tokens, "temperature": point.temperature, "ignore_eos": False}
    if point.temperature > 0:
        params["top_p"] = 1.0
    results, seconds = asyncio.run(_drive(server.url, prompts, point.concurrency, params))
    tokens = sum(r["tokens"] for r in results)
    multi = [r for r in results if r["tokens"] > 1]
    verify = sum(r["verify_steps"] for r in results)
    point.requests, point.output_tokens, point.seconds = len(results), tokens, round(seconds, 4)
    point.tokens_per_second = round(tokens / seconds, 3)
    point.tpot_ms = round(1000 * sum((r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in multi)
                          / max(len(multi), 1), 3)
    point.ttft_ms = round(1000 * sum(r["ttft"] for r in results) / len(results), 3)
    point.accept_length = round(tokens / verify, 4) if verify else None
    point.outputs = [r["output_ids"] for r in results]
    return point


def warm_up(server, prompts: list[list[int]], concurrency: int) -> None:
    """Unmeasured requests before a fresh server's first point: greedy and sampled alone, then a batch as wide as its
    widest point. First calls (allocations, kernel choices, a draft model's first pass) cost seconds on a CPU and
    would otherwise land in whichever point came first."""
    for temperature in (0.0, 1.0):
        asyncio.run(_drive(server.url, prompts[:1], 1, {"max_new_tokens": 16, "temperature": temperature}))
    asyncio.run(_drive(server.url, prompts[:concurrency], concurrency, {"max_new_tokens": 8, "temperature": 0.0}))


# ---- the run -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalPlan:
    model: str
    configs: tuple[ServeConfig, ...]
    datasets: tuple[str, ...]
    temperatures: tuple[float, ...] = TEMPERATURES
    concurrency: tuple[int, ...] = CONCURRENCY
    num_prompts: int = 0  # prompts per point: max(num_prompts, concurrency); 0 means 2 x concurrency
    max_new_tokens: int = 128
    server_args: tuple[str, ...] = ()  # shared by every configuration
    max_total_tokens: int = 8192  # the KV pool: enough for 64 short requests on CPU; raise it on a GPU
    # Passes over every configuration, each with fresh servers: a slow spell of a shared machine then hits every
    # configuration in some round instead of one configuration in all of its points; the report takes medians.
    rounds: int = 1

    def prompts_for(self, concurrency: int) -> int:
        return max(self.num_prompts, concurrency) if self.num_prompts else 2 * concurrency


def load_points(out: str | Path) -> list[Point]:
    path = Path(out) / RESULTS
    if not path.exists():
        return []
    points = []
    for line in path.read_text().splitlines():
        try:
            points.append(Point(**json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue  # a line cut by an interruption: that point runs again
    return points


def run_eval(plan: EvalPlan, out: str | Path, token_prompts: dict[str, list[list[int]]],
             progress: bool = True) -> list[Point]:
    """Measure every point and round of the plan that `out/results.jsonl` lacks; returns every measurement (one per
    point and round: `combine_rounds` makes one per point). `token_prompts` holds each dataset's chat-templated
    prompts (at least as many as the largest point needs)."""
    from tqdm import tqdm

    from flexdraft_sgl.sglang.launch import SGLangServer, default_server_args

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS
    if results.exists() and not results.read_text().endswith("\n"):  # cut mid-line by an interruption: drop the tail
        text = results.read_text()
        results.write_text(text[: text.rfind("\n") + 1])
    done = {p.key + (p.round,) for p in load_points(out)}
    # (round, configuration) -> the points it still lacks, in the order they run
    todo = {(r, c): [(d, float(t), int(n)) for d in plan.datasets for t in plan.temperatures for n in plan.concurrency
                     if (c.name, d, float(t), int(n), r) not in done]
            for r in range(plan.rounds) for c in plan.configs}
    bar = tqdm(total=sum(map(len, todo.values())), desc="eval points", disable=not progress)
    base = default_server_args(plan.model, plan.max_total_tokens) + list(plan.server_args)
    for (round_, config), mine in todo.items():
        if not mine:
            continue
        with SGLangServer(base + list(config.args), env=dict(config.env)) as server:
            widest = max(n for _, _, n in mine)
            warm_up(server, token_prompts[mine[0][0]][: plan.prompts_for(widest)], widest)
            for dataset, temperature, concurrency in mine:
                bar.set_postfix_str(f"round {round_} {config.name} {dataset} T={temperature} c={concurrency}")
                prompts = token_prompts[dataset][: plan.prompts_for(concurrency)]
                point = measure_point(server, Point(config.name, dataset, float(temperature), int(concurrency),
                                                    round=round_), prompts, plan.max_new_tokens)
                with open(results, "a") as f:
                    f.write(json.dumps(asdict(point)) + "\n")
                bar.update()
    bar.close()
    return load_points(out)
