"""`flexdraft eval-tau`: tokens per decoding step (tau) of an adapter, greedy, on MT-Bench and HumanEval.

Greedy decoding is deterministic, so tau can be read off the target's own greedy output y without decoding again:
in both modes the drafts a step verifies come from the mask block anchored just before the step's bonus token,
calibrated with it, and they depend only on the committed prefix, which is a prefix of y. One packed forward per
answer (`train.objective.packed_blocks`, a block after every answer position, float32) therefore gives every draft
decoding could ever see; `walk` replays the steps of either mode under either verify length (the adapter's
confidence rule, or all B-1 drafts) with calibration on or off (the same forward; only the correction differs).
`TauEval.check_against_decoding` decodes some prompts for real with the reference engine and compares the per-step
accepted lengths with the replay (equal up to floating-point ties), and every replay is of the plain output itself,
so "identical to plain" is the engine's own lossless check on those prompts.

Results are cached per (dataset, block size, adapter weights) as they finish, so an interrupted run resumes;
`markdown_table` renders them. A smaller block size than the adapter was trained with keeps mask rows 0..B'-1 of each
block (and their embeddings).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import torch
from torch import Tensor

from ..adapter import FlexDraftAdapter
from ..core.confidence import verify_lengths
from ..reference import ReferenceEngine
from ..reference.hf import prompt_tokens, stop_tokens
from ..train.objective import packed_blocks
from ..train.trainer import atomic_save
from .datasets import DATASETS

MODES = ("parallel", "sequential")
VERIFY = ("rule", "full")
# Longer prompts are skipped (a few ShareGPT first turns run to thousands of tokens; MT-Bench and HumanEval have none).
MAX_PROMPT_TOKENS = 512


# ---- replaying greedy decoding ---------------------------------------------------------------------------------------
@dataclass
class AnswerDrafts:
    """For state P of one answer (the bonus is answer[P]; drafts propose answer[P+1..P+B-1]): which drafts equal the
    answer, and their top probabilities (the confidence rule's input)."""

    matches: Tensor  # [T-1, B-1] bool
    top: Tensor  # [T-1, B-1]


def walk(drafts: AnswerDrafts, length: int, mode: str, verify_lens: Tensor) -> list[int]:
    """Accepted drafts per decode step for an answer of `length` tokens (the first comes from prefill). Parallel: a
    step verifies drafts at P and emits a + 1 tokens. Sequential: a verify forward (a + 1 tokens) and, unless that
    finished the answer, a draft forward emitting one more exact token."""
    leading = torch.cumprod(drafts.matches.long(), dim=1)  # [T-1, B-1]: draft j and all before it match
    trace, P, emitted = [], 0, 1
    while emitted < length:
        v = int(verify_lens[P])
        a = int(leading[P, :v].sum())
        trace.append(a)
        emitted += a + 1
        P += a + 1
        if mode == "sequential" and emitted < length:
            emitted += 1
            P += 1
    return trace


def row_acceptance(drafts: list[AnswerDrafts]) -> list[float]:
    """Acceptance rate of draft row j given rows 1..j-1 were accepted, over every state of every answer whose row j
    target lies inside the answer (the per-position rate a geometric model of tau multiplies up); NaN where no state
    reached row j."""
    if not drafts:
        return []
    width = drafts[0].matches.shape[1]
    accepted = reached = torch.zeros(width, dtype=torch.long)
    j = torch.arange(1, width + 1)
    for d in drafts:
        states = d.matches.shape[0]
        inside = torch.arange(states)[:, None] + j <= states  # state P's row j drafts answer[P + j]
        leading = torch.cumprod(d.matches.long(), dim=1)
        before = torch.cat([torch.ones_like(leading[:, :1]), leading[:, :-1]], dim=1)
        accepted = accepted + (leading * inside).sum(0)
        reached = reached + (before * inside).sum(0)
    return (accepted / reached.clamp(min=1)).where(reached > 0, torch.nan).tolist()


CONFIDENCE_BINS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


def reliability(drafts: list[AnswerDrafts], bins=CONFIDENCE_BINS) -> list[list[dict]]:
    """How well draft confidence predicts acceptance: for each row j and confidence bin, over the states that reach
    row j (rows 1..j-1 accepted) inside the answer, the count, the mean confidence (the draft's top probability,
    what the verify-length rules read) and the acceptance rate. A calibrated drafter has the two equal."""
    width = drafts[0].matches.shape[1] if drafts else 0
    edges = torch.tensor(bins)
    table = []
    for j in range(width):
        conf, hit = [], []
        for d in drafts:
            states = d.matches.shape[0]
            inside = torch.arange(states) + j + 1 <= states
            reached = torch.cumprod(d.matches.long(), 1)[:, j - 1].bool() if j else torch.ones(states, dtype=torch.bool)
            keep = inside & reached
            conf.append(d.top[keep, j].float())
            hit.append(d.matches[keep, j].float())
        conf, hit = (torch.cat(x) if x else torch.zeros(0) for x in (conf, hit))
        which = torch.bucketize(conf, edges[1:-1], right=True)
        table.append([{"low": float(edges[b]), "high": float(edges[b + 1]), "count": int((which == b).sum()),
                       "confidence": float(conf[which == b].mean()) if (which == b).any() else float("nan"),
                       "acceptance": float(hit[which == b].mean()) if (which == b).any() else float("nan")}
                      for b in range(len(edges) - 1)])
    return table


def tau_of(traces: list[list[int]], lengths: list[int]) -> float:
    """Generated tokens after the first, over decode steps (as `RequestStats.tau`, pooled over answers)."""
    steps = sum(len(t) for t in traces)
    return sum(n - 1 for n in lengths) / steps if steps else 0.0


@torch.no_grad()
def answer_drafts(engine: ReferenceEngine, prompt: list[int], answer: list[int]) -> tuple[AnswerDrafts, AnswerDrafts]:
    """Draft matches of every state of one answer, with calibration and without it."""
    if len(answer) < 2:  # no decode step
        width = engine.block_size - 1
        empty = AnswerDrafts(torch.zeros(0, width, dtype=torch.bool), torch.zeros(0, width))
        return empty, empty
    sequence = torch.tensor(prompt + answer, device=engine.device)
    anchors = [len(prompt) - 1 + P for P in range(len(answer) - 1)]
    blocks = packed_blocks(engine, [sequence], [anchors])
    out = []
    calibrated, uncalibrated = engine.draft_logits(blocks.hidden, blocks.bonus), engine.target_logits(blocks.hidden)
    for logits in (calibrated.float(), uncalibrated.float()):
        out.append(AnswerDrafts(matches=(logits.argmax(-1) == blocks.targets) & blocks.valid,
                                top=torch.softmax(logits, -1).amax(-1)))
    return out[0], out[1]


# ---- the evaluation ------------------------------------------------------------------------------------------------
def adapter_variant(adapter: FlexDraftAdapter, block_size: int, calibration: bool = True) -> FlexDraftAdapter:
    """The same weights at another block size and/or with calibration switched off."""
    if not 2 <= block_size <= adapter.config.block_size:
        raise ValueError(f"block size must be between 2 and the adapter's {adapter.config.block_size}")
    variant = copy.deepcopy(adapter)
    variant.config = dataclasses.replace(adapter.config, block_size=block_size)
    variant.mask_embedding = torch.nn.Parameter(adapter.mask_embedding[:block_size].detach().clone())
    if not calibration:
        with torch.no_grad():
            variant.calibration.down.weight.zero_()
            variant.calibration.down.bias.zero_()
    return variant


def adapter_digest(adapter: FlexDraftAdapter) -> str:
    """A short hash of the adapter's weights: cached drafts belong to one adapter (plain answers to none)."""
    h = hashlib.sha256()
    for name, tensor in sorted(adapter.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


class TauEval:
    def __init__(self, model, tokenizer, adapter: FlexDraftAdapter, out_dir: str | Path, *, max_new_tokens: int = 256,
                 batch_size: int = 16, limit: int = 0, progress: bool = True):
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max_new, self.batch_size, self.limit, self.progress = max_new_tokens, batch_size, limit, progress
        self.stop = stop_tokens(model, tokenizer)
        self.adapter_digest = adapter_digest(adapter)  # names its cached drafts

    def _bar(self, items, desc: str):
        from tqdm import tqdm

        return tqdm(items, desc=desc, disable=not self.progress)

    def prompts(self, dataset: str) -> list[list[int]]:
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
        prompts = [ids for ids in (prompt_tokens(self.tokenizer, t) for t in DATASETS[dataset]())
                   if len(ids) <= MAX_PROMPT_TOKENS]
        return prompts[: self.limit] if self.limit else prompts

    def plain_answers(self, dataset: str) -> list[list[int]]:
        """The target's own greedy answers (plain decoding, batched), cached."""
        path = self.out / f"plain-{dataset}-{self.max_new}-{self.limit}.json"
        if path.exists():
            return json.loads(path.read_text())
        engine, answers = ReferenceEngine(self.model), []
        for batch in self._bar(list(_batches(self.prompts(dataset), self.batch_size)), f"{dataset}: plain answers"):
            answers += [r.tokens for r in engine.generate(batch, max_new_tokens=self.max_new, mode="plain",
                                                          stop_token_ids=self.stop)]
        path.write_text(json.dumps(answers))
        return answers

    def drafts(self, dataset: str, block_size: int) -> dict[str, list[AnswerDrafts]]:
        """Draft matches of every answer at one block size, calibration on and off, cached."""
        key = f"{dataset}-B{block_size}-{self.max_new}-{self.limit}-{self.adapter_digest}"
        path = self.out / f"drafts-{key}.pt"
        if path.exists():
            return torch.load(path, weights_only=False)
        engine = ReferenceEngine(self.model, adapter_variant(self.adapter, block_size), self.tokenizer)
        result = {"on": [], "off": []}
        pairs = list(zip(self.prompts(dataset), self.plain_answers(dataset)))
        for prompt, answer in self._bar(pairs, f"{dataset}: drafts at B={block_size}"):
            on, off = answer_drafts(engine, prompt, answer)
            result["on"].append(on)
            result["off"].append(off)
        atomic_save(result, path)
        return result

    def rows(self, datasets: list[str], block_sizes: list[int], verify: list[str]) -> list[dict]:
        cfg = self.adapter.config
        rows = []
        for dataset, B in product(datasets, block_sizes):
            lengths = [len(a) for a in self.plain_answers(dataset)]
            by_calibration = self.drafts(dataset, B)
            for rule, mode, calibration in product(verify, MODES, (True, False)):
                traces = []
                for d, n in zip(by_calibration["on" if calibration else "off"], lengths):
                    v = (torch.full((len(d.top),), B - 1) if rule == "full" else
                         verify_lengths(d.top, cfg.verify_rule, cfg.verify_threshold, max_len=B - 1))
                    traces.append(walk(d, n, mode, v))
                verified = [a for t in traces for a in t]
                rows.append({
                    "dataset": dataset, "mode": mode, "block_size": B, "calibration": calibration, "verify": rule,
                    "answers": len(lengths), "tokens": sum(lengths), "tau": tau_of(traces, lengths),
                    "mean_accepted": sum(verified) / max(len(verified), 1),
                    "accepted_hist": [verified.count(a) for a in range(B)],
                })
        (self.out / "tau.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return rows

    def acceptance_by_row(self, datasets: list[str], block_sizes: list[int]) -> list[dict]:
        """`row_acceptance` of every (dataset, block size), calibration on and off (also written to rows.jsonl)."""
        records = [{"dataset": dataset, "block_size": B, "calibration": on,
                    "row_acceptance": row_acceptance(self.drafts(dataset, B)["on" if on else "off"])}
                   for dataset, B in product(datasets, block_sizes) for on in (True, False)]
        (self.out / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return records

    def reliability_by_row(self, datasets: list[str]) -> list[dict]:
        """`reliability` of the adapter's calibrated drafts at its own block size (also written to
        reliability.jsonl)."""
        B = self.adapter.config.block_size
        records = [{"dataset": d, "block_size": B, "rows": reliability(self.drafts(d, B)["on"])} for d in datasets]
        (self.out / "reliability.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return records

    def check_against_decoding(self, dataset: str, count: int) -> dict:
        """Decode the first `count` prompts for real (reference engine, the adapter as trained, confidence rule,
        both modes) and compare outputs and per-step accepted lengths with the replay."""
        prompts, answers = self.prompts(dataset)[:count], self.plain_answers(dataset)[:count]
        B, cfg = self.adapter.config.block_size, self.adapter.config
        drafts = self.drafts(dataset, B)["on"][:count]
        engine = ReferenceEngine(self.model, self.adapter, self.tokenizer)
        report = {"dataset": dataset, "prompts": len(prompts), "block_size": B}
        for mode in MODES:
            results = []
            for batch in _batches(prompts, self.batch_size):
                results += engine.generate(batch, max_new_tokens=self.max_new, mode=mode, stop_token_ids=self.stop)
            decoded = [[a for a in r.stats.accepted_trace if a >= 0] for r in results]
            replayed = [walk(d, len(a), mode, verify_lengths(d.top, cfg.verify_rule, cfg.verify_threshold,
                                                             max_len=B - 1)) for d, a in zip(drafts, answers)]
            report[mode] = {
                "identical_to_plain": sum(r.tokens == a for r, a in zip(results, answers)),
                "same_accepted_trace": sum(x == y for x, y in zip(decoded, replayed)),
                "tau_decoded": tau_of(decoded, [len(r.tokens) for r in results]),
                "tau_replayed": tau_of(replayed, [len(a) for a in answers]),
            }
        (self.out / f"check-{dataset}.json").write_text(json.dumps(report, indent=2))
        return report


def markdown_table(rows: list[dict]) -> str:
    lines = ["| dataset | mode | B | verify | tau, calibration on | tau, calibration off | mean accepted drafts (on) |",
             "|---|---|---|---|---|---|---|"]
    paired: dict[tuple, dict] = {}
    for r in rows:
        paired.setdefault((r["dataset"], r["mode"], r["block_size"], r["verify"]), {})[r["calibration"]] = r
    for (dataset, mode, B, verify), pair in paired.items():
        on, off = pair.get(True), pair.get(False)
        lines.append(f"| {dataset} | {mode} | {B} | {verify} | {on['tau']:.2f} | {off['tau']:.2f} | "
                     f"{on['mean_accepted']:.2f} |")
    return "\n".join(lines) + "\n"


def row_table(records: list[dict]) -> str:
    width = max(len(r["row_acceptance"]) for r in records)
    lines = ["| dataset | B | calibration | " + " | ".join(f"row {j}" for j in range(1, width + 1)) + " |",
             "|---|---|---|" + "---|" * width]
    for r in records:
        cells = [f"{a:.3f}" for a in r["row_acceptance"]] + [""] * (width - len(r["row_acceptance"]))
        lines.append(f"| {r['dataset']} | {r['block_size']} | {'on' if r['calibration'] else 'off'} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def reliability_table(record: dict) -> str:
    """Acceptance against confidence, one line per row, one cell per bin: "acceptance / confidence (count)"."""
    first = record["rows"][0]
    lines = ["| row | " + " | ".join(f"{b['low']:.2f}-{b['high']:.2f}" for b in first) + " |",
             "|---|" + "---|" * len(first)]
    for j, row in enumerate(record["rows"], 1):
        cells = [f"{b['acceptance']:.2f} / {b['confidence']:.2f} ({b['count']})" if b["count"] else "-" for b in row]
        lines.append(f"| {j} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
