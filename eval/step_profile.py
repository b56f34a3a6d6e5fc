"""Step profile: the wall time of one FLEXDRAFT decode step inside SGLang, part by part, beside a plain SGLang step.

    python eval/step_profile.py --out eval/results/step-profile-cpu [--quick]

One SGLang server per mode (parallel, sequential) and verify width W, started with `--speculative-num-draft-tokens W`
and FLEXDRAFT_VERIFY_THRESHOLD=0, so the confidence rule (and the cap measured acceptance puts on it) grants all W-1
drafts and every step verifies W-1 of them through the default planning path; FLEXDRAFT_PROFILE makes the worker
append one line per decode step with each part timed (`flexdraft_sgl/sglang/profile.py`). Mode `plain` profiles
FLEXDRAFT's own plain step instead (FLEXDRAFT_MODE=flex, FLEXDRAFT_FLEX_MODES=plain: one row per request, what flex
runs when drafting does not pay). Every server gets the same shared arguments (`launch.default_server_args`) and
synthetic prompts (random token ids of one length).

The plain step comes from a plain SGLang server started in the same run with the same arguments plus
`--disable-overlap-schedule` (FLEXDRAFT switches overlap off for itself): with FLEXDRAFT_PROFILE set the plugin times
plain SGLang's decode steps with the same timer at the same boundary, the model-worker call the scheduler makes for
one batch (`TpModelWorker.forward_batch_generation` there, `FlexDraftWorker.forward_batch_generation` here). So both
figures hold the same work: building the forward batch, the forward, sampling or acceptance; neither holds the
scheduler's own bookkeeping, and the client's latency never enters. The scheduler's part shows in "step to step", the
mean time from one step's start to the next's, for both.

At each batch size bs the client sends bs concurrent requests (greedy, or sampled at `--temperature`) with ignore_eos
and a fixed max_new_tokens; the steps that ran the full batch are the steady state, of which the first `--skip` (first
use of new shapes) are dropped and the rest averaged. Writes raw/<server>.jsonl (the profile lines), summary.json and
report.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MODES = ("parallel", "sequential")
WIDTHS = (2, 4, 8)
BATCH_SIZES = (1, 8, 32)
PLAIN = "plain-sglang"

# Parts in the order of a step, with what each holds. Sections nest ("verify/forward/attn_metadata") and each holds
# only its own time, so the parts of a step add up to its total.
PARTS = {
    "plan": "plan: the confidence rule and its measured cap",
    "plan/host_sync": "plan: host sync (the verify length)",
    "verify": "verify: its rows [bonus, drafts]",
    "verify/batch": "verify: building its ForwardBatch",
    "verify/batch/host_sync": "verify: host sync (prefix lengths)",
    "verify/forward": "verify forward (the model)",
    "verify/forward/attn_metadata": "verify forward: attention metadata (CPU: per-request masks, KV indices)",
    "acceptance": "acceptance",
    "bonus": "bonus forward (sequential): the rest",
    "bonus/batch": "bonus forward: building its ForwardBatch",
    "bonus/batch/host_sync": "bonus forward: host sync (prefix lengths)",
    "bonus/forward": "bonus forward (the model)",
    "bonus/forward/attn_metadata": "bonus forward: attention metadata",
    "bonus/sample": "bonus forward: sampling the exact token",
    "mask_block": "mask block: final norm and calibration",
    "mask_block/gather_kv": "mask block: gathering the committed K/V",
    "mask_block/gather_kv/host_sync": "mask block: host sync (longest prefix)",
    "mask_block/layers": "mask block: its N layers",
    "mask_block/lm_head": "mask block: LM head over the draft rows",
    "draft_sampling": "draft sampling (sampling requests only)",
    "host_sync": "host sync: measured acceptance read-back (1 step in 16)",
    "other": "state bookkeeping (the rest of the step)",
}


# ---- the figures, from profile lines (pure) -------------------------------------------------------------------------
def steady(lines: list[dict], bs: int, skip: int) -> list[dict]:
    """The steps that ran the full batch, without the first `skip` of them."""
    return [line for line in lines if line["bs"] == bs][skip:]


def summarize(lines: list[dict]) -> dict:
    """Mean seconds of each part and of the whole step over `lines` (a part absent from a step counts 0), the
    median step (far below the mean, it shows steps slowed by something else running on the machine), and the mean
    interval from one step's start to the next's: the step plus the scheduler's work between steps."""
    if not lines:
        return {"steps": 0, "sections": {}, "total": None, "median_total": None, "interval": None}
    names = list(dict.fromkeys(name for line in lines for name in line["sections"]))
    starts = [line["start"] for line in lines if "start" in line]
    interval = (starts[-1] - starts[0]) / (len(starts) - 1) if len(starts) == len(lines) > 1 else None
    return {"steps": len(lines),
            "sections": {n: sum(line["sections"].get(n, 0.0) for line in lines) / len(lines) for n in names},
            "total": sum(line["total"] for line in lines) / len(lines),
            "median_total": statistics.median(line["total"] for line in lines),
            "interval": interval}


def _cell(seconds: float | None, plain: float | None) -> str:
    if seconds is None:
        return "-"
    fraction = f" ({seconds / plain:.2f})" if plain else ""
    return f"{1000 * seconds:.2f} ms{fraction}"


def markdown_tables(points: list[dict]) -> str:
    """One table per (mode, W): a line per part, a column per batch size, each cell "ms (fraction of a plain step at
    that batch size)"; then the whole step, the plain step and the tokens each step emitted."""
    out = []
    configs = list(dict.fromkeys((p["mode"], p["width"]) for p in points))
    for mode, width in configs:
        mine = sorted((p for p in points if (p["mode"], p["width"]) == (mode, width)), key=lambda p: p["bs"])
        names = list(dict.fromkeys(n for p in mine for n in p["sections"]))
        ordered = [n for n in PARTS if n in names] + [n for n in names if n not in PARTS]
        title = (f"{mode}, W = {width} ({width - 1} drafts verified per step)" if mode != "plain" else
                 "plain: flex allowed only plain steps (FLEXDRAFT_FLEX_MODES=plain), one row per request")
        out += [f"### {title}", "",
                "| part | " + " | ".join(f"bs {p['bs']}" for p in mine) + " |",
                "|---|" + "---|" * len(mine)]
        for name in ordered:
            out.append(f"| {PARTS.get(name, name)} | "
                       + " | ".join(_cell(p["sections"].get(name), p["plain"]) for p in mine) + " |")
        out.append("| **FLEXDRAFT step** | " + " | ".join(f"**{_cell(p['total'], p['plain'])}**" for p in mine) + " |")
        out.append("| FLEXDRAFT step, median | " + " | ".join(_cell(p.get("median_total"), None) for p in mine) + " |")
        out.append("| plain SGLang step | " + " | ".join(_cell(p["plain"], None) for p in mine) + " |")
        out.append("| FLEXDRAFT step to step (scheduler included) | "
                   + " | ".join(_cell(p.get("interval"), p.get("plain_interval")) for p in mine) + " |")
        out.append("| plain SGLang step to step | " + " | ".join(_cell(p.get("plain_interval"), None) for p in mine)
                   + " |")
        out.append("| tokens per step (these prompts) | "
                   + " | ".join(f"{p['tokens_per_step']:.2f}" if p.get("tokens_per_step") else "-" for p in mine)
                   + " |")
        out.append("| full-batch steps averaged | " + " | ".join(str(p["steps"]) for p in mine) + " |")
        out.append("")
    return "\n".join(out)


# ---- the run ------------------------------------------------------------------------------------------------------
def _read_from(path: Path, offset: int) -> list[dict]:
    if not path.exists():
        return []
    with open(path) as f:
        f.seek(offset)
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(count)]


def _generate(server, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0) -> list[dict]:
    params = {"max_new_tokens": max_new_tokens, "temperature": temperature, "ignore_eos": True}
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda ids: server.post("/generate", {"input_ids": ids, "sampling_params": params}),
                             prompts))


def profiled_burst(server, raw: Path, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                   skip: int) -> tuple[list[dict], list[dict], float]:
    """Send `prompts` at once: their replies, the full-batch steps they ran (read from the server's profile file
    `raw`, the first `skip` dropped) and the wall seconds the burst took."""
    offset = _size(raw)
    start = time.perf_counter()
    replies = _generate(server, prompts, max_new_tokens, temperature)
    seconds = time.perf_counter() - start
    return replies, steady(_read_from(raw, offset), len(prompts), skip), seconds


def profile_server(name: str, args: list[str], env: dict, out: Path, batch_sizes, *, vocab: int, prompt_len: int,
                   max_new_tokens: int, temperature: float, skip: int, log=print) -> list[dict]:
    """Start one server with FLEXDRAFT_PROFILE=out/raw/<name>.jsonl; per batch size, the steady steps' figures."""
    from flexdraft_sgl.sglang.launch import SGLangServer

    raw = out / "raw" / f"{name}.jsonl"
    raw.unlink(missing_ok=True)
    points = []
    with SGLangServer(args, env={**env, "FLEXDRAFT_PROFILE": str(raw)}, startup_timeout=900) as server:
        _generate(server, _prompts(1, prompt_len, vocab, seed=99), 8)  # warm-up
        for bs in batch_sizes:
            replies, lines, _ = profiled_burst(server, raw, _prompts(bs, prompt_len, vocab, seed=bs), max_new_tokens,
                                               temperature, skip)
            verify = sum(r["meta_info"].get("spec_verify_ct", 0) for r in replies)
            tokens = sum(len(r["output_ids"]) for r in replies)
            points.append({"server": name, "bs": bs, "tokens_per_step": tokens / verify if verify else None,
                           "widths": sorted({line["width"] for line in lines}), **summarize(lines)})
            log(f"{name} bs {bs}: {points[-1]['steps']} full-batch steps, "
                f"{1000 * (points[-1]['total'] or 0):.1f} ms per step")
    return points


def run(model: str, adapter: str, out: Path, *, modes, widths, batch_sizes, prompt_len: int, max_new_tokens: int,
        temperature: float, skip: int, max_total_tokens: int, log=print) -> list[dict]:
    from transformers import AutoConfig

    from flexdraft_sgl.sglang.launch import default_server_args, flexdraft_args

    out.mkdir(parents=True, exist_ok=True)
    (out / "raw").mkdir(exist_ok=True)
    vocab = AutoConfig.from_pretrained(model).vocab_size
    base = default_server_args(model, max_total_tokens) + ["--skip-tokenizer-init"]
    common = dict(vocab=vocab, prompt_len=prompt_len, max_new_tokens=max_new_tokens, temperature=temperature,
                  skip=skip, log=log)
    plain = {p["bs"]: p for p in profile_server(PLAIN, base + ["--disable-overlap-schedule"], {}, out, batch_sizes,
                                                **common)}
    points = []
    for mode in modes:
        for width in (1,) if mode == "plain" else widths:
            if mode == "plain":  # FLEXDRAFT's own plain step: flex allowed nothing else
                args = base + flexdraft_args(adapter)
                env, name = {"FLEXDRAFT_MODE": "flex", "FLEXDRAFT_FLEX_MODES": "plain"}, "flex-plain"
            else:
                args = base + flexdraft_args(adapter) + ["--speculative-num-draft-tokens", str(width)]
                env, name = {"FLEXDRAFT_MODE": mode, "FLEXDRAFT_VERIFY_THRESHOLD": "0"}, f"{mode}-W{width}"
            for p in profile_server(name, args, env, out, batch_sizes, **common):
                if p["widths"] not in ([], [width]):
                    raise RuntimeError(f"{name} bs={p['bs']}: steps verified widths {p['widths']}, not {width} alone")
                base_point = plain[p["bs"]]
                points.append({**p, "mode": mode, "width": width, "plain": base_point["total"],
                               "plain_interval": base_point.get("interval")})
    return points


def report(points: list[dict], *, model: str, adapter: str, prompt_len: int, max_new_tokens: int, temperature: float,
           skip: int) -> str:
    decoding = "greedy" if temperature == 0 else f"sampled at temperature {temperature:g}"
    head = (f"Step profile of FLEXDRAFT in SGLang (`eval/step_profile.py`): target `{Path(model).name}`, adapter "
            f"`{Path(adapter).name}`, {prompt_len}-token synthetic prompts, {decoding}, {max_new_tokens} new tokens "
            f"per request (ignore_eos); per batch size bs, the mean over the steps that ran all bs requests (the first "
            f"{skip} dropped). Each cell: milliseconds per step, and in brackets as a fraction of a plain SGLang "
            "decode step at the same batch size, timed in the same run at the same boundary (the model-worker call "
            "the scheduler makes for one batch; overlap scheduling off for both). Parts hold only their own time "
            "(a nested part is not in its parent), so they add up to the step. \"Step to step\" is the mean time from "
            "one step's start to the next's: the step and the scheduler's work around it.")
    return head + "\n\n" + markdown_tables(points)


def main(argv=None) -> int:
    from flexdraft_sgl.default_model import default_adapter_path, prepare_default_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="target folder (default: the embedded SmolLM2)")
    p.add_argument("--adapter", default=None, help="adapter folder (default: the shipped one)")
    p.add_argument("--out", required=True)
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"of {', '.join(MODES + ('plain',))}; plain: FLEXDRAFT's plain step (flex allowed only it)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    p.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--skip", type=int, default=2, help="full-batch steps dropped at the start of each point")
    p.add_argument("--max-total-tokens", type=int, default=16384)
    p.add_argument("--quick", action="store_true", help="smoke run: W 4, bs 1 and 4, 16 new tokens")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.batch_sizes, args.max_new_tokens, args.prompt_len, args.skip = "4", "1,4", 16, 32, 1
    model = args.model or str(prepare_default_model())
    adapter = args.adapter or str(default_adapter_path())
    out = Path(args.out)
    settings = dict(prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    skip=args.skip)
    points = run(model, adapter, out, modes=args.modes.split(","), widths=[int(w) for w in args.widths.split(",")],
                 batch_sizes=[int(b) for b in args.batch_sizes.split(",")], max_total_tokens=args.max_total_tokens,
                 **settings)
    (out / "summary.json").write_text(json.dumps(points, indent=1) + "\n")
    text = report(points, model=model, adapter=adapter, **settings)
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
