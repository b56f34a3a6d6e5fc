"""Plain baseline check: does plain SGLang's decoding carry a cost FLEXDRAFT's plain step avoids, or do server
processes of the same code simply run at different speeds?

    python eval/plain_baseline.py --out eval/results/step-profile-cpu/plain-baseline [--sets 3 --rounds 4]

Three servers are started together and kept up at once, with the same shared arguments (`launch.default_server_args`)
and `--sleep-on-idle`, so that the two waiting while the third decodes take no CPU:

    plain        plain SGLang as the serving grid runs it (overlap scheduling on)
    plain-sync   plain SGLang with --disable-overlap-schedule (what FLEXDRAFT switches off for itself)
    flex-plain   FLEXDRAFT allowed only plain steps (FLEXDRAFT_MODE=flex, FLEXDRAFT_FLEX_MODES=plain)

and measured in alternation: each round sends one burst of bs concurrent requests (synthetic prompts, greedy,
ignore_eos) to each server in turn, the order rotated from round to round, so a slow minute of the machine falls on
all three alike. The set is started afresh `--sets` times. A cost one path carries shows as a ratio that holds in
every set; a per-process spread shows as the same server's figures moving from set to set while the ratios do not
follow the path.

Per burst: tokens per second at the client (what the serving grid measures) and, from FLEXDRAFT_PROFILE, the mean
full-batch step of the model-worker call (the step profile's boundary; not defined under overlap scheduling, where
the forward of one step overlaps the next's preparation). Writes raw/, bursts.jsonl, summary.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

from flexdraft_sgl.eval.step_profile import _generate, _prompts, profiled_burst

SERVERS = ("plain", "plain-sync", "flex-plain")


# ---- the figures (pure) ---------------------------------------------------------------------------------------------
def summarize(bursts: list[dict]) -> dict:
    """Per (set, bs, server): median client tokens/s and median step over the rounds; per (set, bs): each server's
    tokens/s as a ratio to plain's of the same set."""
    cells: dict[tuple, dict] = {}
    for b in bursts:
        cell = cells.setdefault((b["set"], b["bs"], b["server"]), {"tps": [], "step": []})
        cell["tps"].append(b["tokens"] / b["seconds"])
        if b.get("step") is not None:
            cell["step"].append(b["step"])
    rows = []
    for (set_, bs, server), cell in sorted(cells.items()):
        plain = cells.get((set_, bs, "plain"))
        tps = statistics.median(cell["tps"])
        rows.append({"set": set_, "bs": bs, "server": server, "rounds": len(cell["tps"]), "tokens_per_s": tps,
                     "tps_spread": (min(cell["tps"]), max(cell["tps"])),
                     "step": statistics.median(cell["step"]) if cell["step"] else None,
                     "vs_plain": tps / statistics.median(plain["tps"]) if plain else None})
    return {"rows": rows}


def markdown(summary: dict, servers: tuple[str, ...]) -> str:
    rows = summary["rows"]
    out = []
    for bs in sorted({r["bs"] for r in rows}):
        out += [f"### batch {bs}", "",
                "| set | " + " | ".join(f"{s}: tok/s (min-max)" for s in servers) + " | "
                + " | ".join(f"{s} step" for s in servers) + " | "
                + " | ".join(f"{s} / plain" for s in servers if s != "plain") + " |",
                "|---|" + "---|" * (3 * len(servers) - 1)]
        for set_ in sorted({r["set"] for r in rows}):
            mine = {r["server"]: r for r in rows if r["bs"] == bs and r["set"] == set_}
            tps = [f"{mine[s]['tokens_per_s']:.1f} ({mine[s]['tps_spread'][0]:.1f}-{mine[s]['tps_spread'][1]:.1f})"
                   if s in mine else "-" for s in servers]
            steps = [f"{1000 * mine[s]['step']:.1f} ms" if s in mine and mine[s]["step"] else "-" for s in servers]
            ratios = [f"{mine[s]['vs_plain']:.2f}" if s in mine and mine[s]["vs_plain"] else "-"
                      for s in servers if s != "plain"]
            out.append(f"| {set_} | " + " | ".join(tps + steps + ratios) + " |")
        out.append("")
    return "\n".join(out)


# ---- the run --------------------------------------------------------------------------------------------------------
def server_configs(model: str, adapter: str, max_total_tokens: int) -> dict[str, tuple[list[str], dict]]:
    """The serving grid's own plain configurations (`serving.serve_configs`) and its flex server allowed plain steps
    alone, on the shared arguments plus --sleep-on-idle."""
    from flexdraft_sgl.eval.serving import serve_configs
    from flexdraft_sgl.sglang.launch import default_server_args

    base = default_server_args(model, max_total_tokens) + ["--skip-tokenizer-init", "--sleep-on-idle"]
    grid = serve_configs(adapter)
    chosen = {"plain": grid["plain"], "plain-sync": grid["plain-sync"], "flex-plain": grid["flexdraft-flex"]}
    configs = {name: (base + list(c.args), dict(c.env)) for name, c in chosen.items()}
    configs["flex-plain"][1]["FLEXDRAFT_FLEX_MODES"] = "plain"
    return configs


def run(model: str, adapter: str, out: Path, *, servers, sets: int, rounds: int, batch_sizes, prompt_len: int,
        max_new_tokens: int, skip: int, max_total_tokens: int, log=print) -> list[dict]:
    from transformers import AutoConfig

    from flexdraft_sgl.sglang.launch import SGLangServer

    (out / "raw").mkdir(parents=True, exist_ok=True)
    vocab = AutoConfig.from_pretrained(model).vocab_size
    configs = server_configs(model, adapter, max_total_tokens)
    bursts_path = out / "bursts.jsonl"
    bursts = [json.loads(line) for line in bursts_path.read_text().splitlines()] if bursts_path.exists() else []
    for set_ in range(sets):
        if any(b["set"] == set_ for b in bursts):  # resume: a finished set is kept
            log(f"set {set_}: already measured")
            continue
        with ExitStack() as stack:
            live = {}
            for name in servers:
                args, env = configs[name]
                raw = out / "raw" / f"set{set_}-{name}.jsonl"
                raw.unlink(missing_ok=True)
                live[name] = (stack.enter_context(SGLangServer(args, env={**env, "FLEXDRAFT_PROFILE": str(raw)},
                                                               startup_timeout=900)), raw)
                _generate(live[name][0], _prompts(1, prompt_len, vocab, seed=99), 8)  # warm-up
            mine = []
            for r in range(rounds):
                order = list(servers[r % len(servers):]) + list(servers[:r % len(servers)])
                for bs in batch_sizes:
                    prompts = _prompts(bs, prompt_len, vocab, seed=1000 * r + bs)
                    for name in order:
                        replies, lines, seconds = profiled_burst(*live[name], prompts, max_new_tokens, 0.0, skip)
                        mine.append({"set": set_, "round": r, "bs": bs, "server": name, "seconds": seconds,
                                     "tokens": sum(len(x["output_ids"]) for x in replies),
                                     "step": statistics.mean(x["total"] for x in lines) if lines else None})
                        log(f"set {set_} round {r} bs {bs} {name}: {mine[-1]['tokens'] / seconds:.1f} tok/s")
        with open(bursts_path, "a") as f:  # a set is written whole, so a resumed run never mixes processes
            f.writelines(json.dumps(b) + "\n" for b in mine)
        bursts += mine
    return bursts


def main(argv=None) -> int:
    from flexdraft_sgl.default_model import default_adapter_path, prepare_default_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="target folder (default: the embedded SmolLM2)")
    p.add_argument("--adapter", default=None, help="adapter folder (default: the shipped one)")
    p.add_argument("--out", required=True)
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--sets", type=int, default=3, help="fresh sets of servers")
    p.add_argument("--rounds", type=int, default=4, help="bursts per server and batch size in a set")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--skip", type=int, default=2, help="full-batch steps dropped at the start of each burst")
    p.add_argument("--max-total-tokens", type=int, default=16384)
    args = p.parse_args(argv)
    servers = tuple(args.servers.split(","))
    if unknown := set(servers) - set(SERVERS):
        p.error(f"unknown servers {sorted(unknown)}; choose from {SERVERS}")
    model = args.model or str(prepare_default_model())
    out = Path(args.out)
    bursts = run(model, args.adapter or str(default_adapter_path()), out, servers=servers, sets=args.sets,
                 rounds=args.rounds, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                 prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens, skip=args.skip,
                 max_total_tokens=args.max_total_tokens)
    summary = summarize(bursts)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    text = (f"Plain baseline check (`eval/plain_baseline.py`): target `{Path(model).name}`, {args.prompt_len}-token "
            f"synthetic prompts, greedy, {args.max_new_tokens} new tokens per request; per set of servers kept up "
            f"together and batch size: each server's median client tokens/s over {args.rounds} alternating bursts "
            "(min-max), its median full-batch step (model-worker call), and its tokens/s over plain's in the same "
            "set.\n\n" + markdown(summary, servers))
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
