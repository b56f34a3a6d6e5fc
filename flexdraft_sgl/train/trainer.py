"""`flexdraft train`: fit an adapter to a frozen target on self-distillation data (`train.data`).

The target runs once per sequence up to the split layer; those hidden states are cached, so a step runs only the final
N layers over the clean rows plus `anchors_per_sequence` mask blocks (`objective.mask_block_loss`). Sequence order and
anchors are functions of (seed, step), so a resumed run sees exactly the batches an uninterrupted one would; a
checkpoint (adapter, optimiser, step, losses) is written atomically every `checkpoint_every` steps.

Calibration is trained jointly with the rest, or as a second stage (`calibration="second-stage"`: `steps` without it,
then `calibration_steps` with everything else frozen), which makes "without calibration" an exact ablation.

Mask embeddings start either at the mean split-layer hidden state of the data, learning at a rate scaled to it
(`mask_init="split-mean"`: at the lr the projectors need they would stay put, and every row of a block would enter
the deep layers alike), or as small random vectors at the scale of a token embedding (`"token-scale"`, the authors'
release), learning at the base rate (`Trainer.prepare`).

Output folder:
  checkpoint.pt        latest training state (resume)
  split_hidden.pt      cached split-layer hidden states of every sample
  log.jsonl            one line per step: step, loss, lr, seconds
  snapshots/step-N/    the adapter after step N (`run(snapshot_steps)`), bfloat16
  adapter/             the trained adapter (weights saved in `save_dtype`)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..adapter import FlexDraftAdapter
from ..core.layout import build_layout
from ..reference import ReferenceEngine
from .data import Sample
from .objective import mask_block_loss, random_anchors

CALIBRATION_MODES = ("joint", "second-stage")
MASK_INITS = ("split-mean", "token-scale")
# What split_hidden.pt and checkpoints hold. v1 (before 2026-12) cached the LAST layer's output instead of the split
# layer's input, so its cache and every adapter trained on it are refused.
SPLIT_HIDDEN_FORMAT = "input-of-split-layer/v2"
# The mask embeddings' lr, in units of their starting RMS times the base lr: rows must move apart by a visible fraction
# of a vector whose RMS is in the tens within a few hundred steps.
MASK_EMBEDDING_LR_SCALE = 5.0


@dataclass(frozen=True)
class TrainConfig:
    tuned_depth: int = 4
    block_size: int = 8
    calibration_rank: int = 64
    calibration_form: str = "logits"  # AdapterConfig.calibration_form
    calibration_input: str = "unit-rms"  # AdapterConfig.calibration_input
    mask_init: str = "split-mean"
    steps: int = 2000
    sequences_per_step: int = 4
    anchors_per_sequence: int = 32
    max_length: int = 512  # tokens per training sequence (prompt + response), longer ones are cut
    lr: float = 5e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    loss_decay: float = 0.85  # weight of draft row j is loss_decay ** (j - 1)
    calibration: str = "joint"
    calibration_steps: int = 0  # second stage only
    checkpoint_every: int = 100
    seed: int = 0
    compute_dtype: str = "float32"  # "bfloat16": autocast (adapter weights stay float32)
    grad_checkpointing: bool = False
    init_adapter: str = ""  # start from this adapter's weights (same N, B, r) instead of the target's copy

    def __post_init__(self):
        if self.calibration not in CALIBRATION_MODES:
            raise ValueError(f"calibration must be one of {CALIBRATION_MODES}, not {self.calibration!r}")
        if self.mask_init not in MASK_INITS:
            raise ValueError(f"mask_init must be one of {MASK_INITS}, not {self.mask_init!r}")
        if self.block_size < 2 or self.tuned_depth < 1 or self.sequences_per_step < 1:
            raise ValueError("block_size >= 2, tuned_depth >= 1 and sequences_per_step >= 1 are needed")
        if self.steps < 0 or self.total_steps < 1:
            raise ValueError("nothing to train: give steps (or calibration steps with calibration='second-stage')")

    @property
    def total_steps(self) -> int:
        return self.steps + (self.calibration_steps if self.calibration == "second-stage" else 0)


def cosine_schedule(lr: float, step: int, warmup_steps: int, length: int) -> float:
    """Linear warm-up over warmup_steps, then cosine down to a tenth of lr at `length` steps."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(length - warmup_steps, 1)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def learning_rate(config: TrainConfig, step: int) -> float:
    """The cosine schedule, restarted for the calibration stage."""
    if step >= config.steps:
        return cosine_schedule(config.lr, step - config.steps, config.warmup_steps, config.calibration_steps)
    return cosine_schedule(config.lr, step, config.warmup_steps, config.steps)


def batch_for_step(config, num_samples: int, step: int) -> list[int]:
    """Sample indices of a step: consecutive slices of a per-epoch permutation seeded by (seed, epoch). `config` is
    any training config with `sequences_per_step` and `seed` (FlexDraft's and EAGLE-3's)."""
    per_epoch = max(num_samples // config.sequences_per_step, 1)
    epoch, slot = divmod(step, per_epoch)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
    return order[slot * config.sequences_per_step:(slot + 1) * config.sequences_per_step].tolist()


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, key: dict, refuse=None) -> dict | None:
    """The training state saved at `path` (None if there is none yet), after `refuse(state)` (a trainer's own,
    more telling refusals) and a check that it belongs to this run: the same settings and data (`key`)."""
    if not path.exists():
        return None
    state = torch.load(path, weights_only=False)
    if refuse is not None:
        refuse(state)
    if state["key"] != key:
        raise ValueError(f"{path} belongs to a run with other settings or data; use a new --out folder")
    return state


def run_steps(trainer, step_fn, total_steps: int, checkpoint_every: int, lr_at, progress: bool = True,
              after_step=None) -> None:
    """The loop both trainers (FlexDraft's, EAGLE-3's) share, from `trainer.step` to `total_steps`: `step_fn()` trains
    one step (advancing trainer.step) and returns its loss and any more figures to log; one line per step goes to
    trainer.out/log.jsonl (step, loss, lr = `lr_at(step - 1)`, seconds, the figures) and a checkpoint
    (`trainer.save_checkpoint()`) is written every `checkpoint_every` steps and at the end, so rerunning the same
    command resumes; `after_step(step)` runs before the checkpoint."""
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=trainer.step, desc="training", unit="step", disable=not progress)
    with open(trainer.out / "log.jsonl", "a") as log:
        while trainer.step < total_steps:
            started = time.perf_counter()
            loss, figures = step_fn()
            log.write(json.dumps({"step": trainer.step, "loss": round(loss, 5), "lr": lr_at(trainer.step - 1),
                                  "seconds": round(time.perf_counter() - started, 3), **figures}) + "\n")
            recent = trainer.losses[-50:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
            bar.update(1)
            if after_step is not None:
                after_step(trainer.step)
            if trainer.step % checkpoint_every == 0 or trainer.step == total_steps:
                log.flush()
                trainer.save_checkpoint()
    bar.close()


def train_summary(config, samples: list[Sample], sequences, losses: list[float], seconds: float, **more) -> dict:
    """train_summary.json of a finished run: the command, settings, data sizes, time and losses."""
    tail = losses[-100:]
    return {
        "command": " ".join(["flexdraft", *sys.argv[1:]]),
        "config": asdict(config), "samples": len(samples),
        "sequence_tokens": sum(len(x) for x in sequences),
        "response_tokens": sum(len(s.response_ids) for s in samples),
        "train_seconds": round(seconds, 1), "first_loss": losses[0] if losses else None,
        "final_loss_mean_last_100": sum(tail) / len(tail) if tail else None, **more,
    }


class Trainer:
    def __init__(self, model, tokenizer, samples: list[Sample], out_dir: str | Path, config: TrainConfig,
                 target_name: str = "", progress: bool = True):
        if not samples:
            raise ValueError("no training samples")
        self.config, self.out, self.progress = config, Path(out_dir), progress
        self.out.mkdir(parents=True, exist_ok=True)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.samples = samples
        device = next(model.parameters()).device
        self.sequences = [torch.tensor(s.tokens[: config.max_length], device=device) for s in samples]
        # Anchors only where decoding puts them: after the last prompt token and inside the response.
        self.first_anchor = [min(len(s.prompt_ids), config.max_length) - 1 for s in samples]
        adapter = FlexDraftAdapter.init_from_target(
            model, tuned_depth=config.tuned_depth, block_size=config.block_size,
            calibration_rank=config.calibration_rank, calibration_form=config.calibration_form,
            calibration_input=config.calibration_input, tokenizer=tokenizer, target_name=target_name, seed=config.seed,
        ).float()
        if config.init_adapter:
            start = FlexDraftAdapter.load(config.init_adapter, target_config=model.config, dtype=torch.float32)
            shape = ("tuned_depth", "block_size", "calibration_rank", "calibration_form", "calibration_input")
            theirs, ours = ([getattr(c, f) for f in shape] for c in (start.config, config))
            if theirs != ours:
                raise ValueError(f"{config.init_adapter} has {dict(zip(shape, theirs))}; this run trains "
                                 f"{dict(zip(shape, ours))}")
            adapter.load_state_dict(start.state_dict())
        self.adapter = adapter
        self.engine = ReferenceEngine(model, adapter, tokenizer)
        self.engine.checkpoint_layers = config.grad_checkpointing
        # Adam moves every weight by about lr per step whatever its scale, so the mask embeddings, which live at the
        # scale of the split layer's residual stream, get their own group whose lr is scaled to it (`prepare`).
        others = [p for name, p in adapter.named_parameters() if name != "mask_embedding"]
        self.optimizer = torch.optim.AdamW(
            [{"params": others, "lr_scale": 1.0}, {"params": [adapter.mask_embedding], "lr_scale": 1.0}],
            lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay,
        )
        self.step, self.losses, self.seconds = 0, [], 0.0  # seconds: training time over all resumed runs
        self._resume()

    # ---- state -------------------------------------------------------------------------------------------------
    def _state_key(self) -> dict:
        return {"config": asdict(self.config), "sample_indices": [s.index for s in self.samples],
                "split_hidden": SPLIT_HIDDEN_FORMAT}

    def _resume(self) -> None:
        path = self.out / "checkpoint.pt"

        def refuse_v1(state):
            if state["key"].get("split_hidden") != SPLIT_HIDDEN_FORMAT:
                raise ValueError(f"{path} was trained by an older trainer that fed the deep layers the last layer's "
                                 "output instead of the split layer's input; it cannot be resumed: use a new --out "
                                 "folder")

        state = load_checkpoint(path, self._state_key(), refuse_v1)
        if state is None:
            return
        self.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.losses, self.seconds = state["step"], state["losses"], state["seconds"]

    def save_checkpoint(self) -> None:
        atomic_save({"key": self._state_key(), "adapter": self.adapter.state_dict(),
                      "optimizer": self.optimizer.state_dict(), "step": self.step, "losses": self.losses,
                      "seconds": self.seconds},
                     self.out / "checkpoint.pt")

    def _autocast(self):
        if self.config.compute_dtype == "float32":
            return contextlib.nullcontext()
        device = self.engine.device.type
        return torch.autocast(device_type=device, dtype=getattr(torch, self.config.compute_dtype))

    @torch.no_grad()
    def split_hidden(self, batch_tokens: int = 4096) -> list[torch.Tensor]:
        """Every sequence's hidden states entering the split layer (`ReferenceEngine.split_hidden_states`, what
        decoding feeds the deep layers), computed once and cached on disk."""
        from tqdm import tqdm

        path = self.out / "split_hidden.pt"
        key = {"format": SPLIT_HIDDEN_FORMAT, "split_layer": self.engine.split_layer,
               "lengths": [len(x) for x in self.sequences], "dtype": self.config.compute_dtype,
               "indices": [s.index for s in self.samples]}
        if path.exists():
            cached = torch.load(path, weights_only=False)
            if cached["key"] == key:
                return cached["hidden"]
            old = "an older trainer's (it holds the last layer's output)" if "format" not in cached["key"] else \
                "another run's"
            print(f"{path} is {old}: not used, computing it again", file=sys.stderr)
        hidden, i = [], 0
        bar = tqdm(total=len(self.sequences), desc="split-layer hidden states", unit="seq", disable=not self.progress)
        while i < len(self.sequences):
            group = [self.sequences[i]]
            while i + len(group) < len(self.sequences) and \
                    sum(map(len, group)) + len(self.sequences[i + len(group)]) <= batch_tokens:
                group.append(self.sequences[i + len(group)])
            layout = build_layout([0] * len(group), [len(x) for x in group], [[] for _ in group], 1)
            with self._autocast():
                x = self.engine.split_hidden_states(layout, torch.cat(group), None)
            hidden += list(x.split([len(g) for g in group]))
            i += len(group)
            bar.update(len(group))
        bar.close()
        hidden = [h.to("cpu", copy=True) for h in hidden]  # host memory; a step moves its few to the device
        atomic_save({"key": key, "hidden": hidden}, path)
        return hidden

    def prepare(self) -> list[torch.Tensor]:
        """The cached split-layer hidden states, and (a fresh run) the mask embeddings' start and learning rate:
        `split-mean` starts every row at the mean split-layer state, where the deep layers expect their input (the
        residual stream there is hundreds of times larger than a token embedding), with an lr scaled to it;
        `token-scale` starts each row at a random vector at the scale of a token embedding, at the base lr."""
        hidden = self.split_hidden()
        embedding = self.adapter.mask_embedding
        if self.config.mask_init == "split-mean":
            mean = sum(h.double().sum(0) for h in hidden) / sum(len(h) for h in hidden)
            self.optimizer.param_groups[1]["lr_scale"] = MASK_EMBEDDING_LR_SCALE * float(mean.pow(2).mean().sqrt())
            start = mean.to(embedding.dtype).expand_as(embedding)
        else:
            tokens = self.model.get_input_embeddings().weight.float()
            g = torch.Generator().manual_seed(self.config.seed)
            start = torch.randn(embedding.shape, generator=g) * float(tokens.pow(2).mean().sqrt())
        if self.step == 0 and not self.config.init_adapter:
            with torch.no_grad():
                embedding.copy_(start.to(embedding.device, embedding.dtype))
        return hidden

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _set_stage(self, step: int) -> None:
        """Which weights train at `step`: all (joint), all but calibration (stage 1), only calibration (stage 2)."""
        second = self.config.calibration == "second-stage"
        for name, p in self.adapter.named_parameters():
            is_calibration = name.startswith("calibration.")
            p.requires_grad_(not second or (is_calibration == (step >= self.config.steps)))

    def step_inputs(self, step: int) -> tuple[list[int], list[list[int]]]:
        """The samples of `step` and the mask-block anchors in each: functions of (seed, step) alone."""
        c = self.config
        indices = batch_for_step(c, len(self.sequences), step)
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        return indices, [random_anchors(len(self.sequences[i]), c.anchors_per_sequence, g, self.first_anchor[i])
                         for i in indices]

    def train_step(self, split_hidden: list[torch.Tensor]) -> float:
        c = self.config
        started = time.perf_counter()
        self._set_stage(self.step)
        indices, anchors = self.step_inputs(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(c, self.step) * group["lr_scale"]
        with self._autocast():
            loss = mask_block_loss(self.engine, [self.sequences[i] for i in indices], anchors, c.loss_decay,
                                   [split_hidden[i].to(self.engine.device) for i in indices])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.adapter.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        self.losses.append(loss.item())
        self.seconds += time.perf_counter() - started
        return self.losses[-1]

    def run(self, snapshot_steps: tuple[int, ...] = ()) -> FlexDraftAdapter:
        """Train to the end (from the last checkpoint); the adapter as it is after each of `snapshot_steps` is saved
        to snapshots/step-NNNNN, for curves of what longer training buys."""
        c = self.config
        split_hidden = self.prepare()

        def snapshot(step):
            if step in snapshot_steps:
                self.trained_adapter().save(self.out / "snapshots" / f"step-{step:05d}", dtype=torch.bfloat16)

        run_steps(self, lambda: (self.train_step(split_hidden), {}), c.total_steps, c.checkpoint_every,
                  lambda step: learning_rate(c, step), self.progress, after_step=snapshot)
        return self.trained_adapter()

    def trained_adapter(self) -> FlexDraftAdapter:
        self.adapter.config = dataclasses.replace(self.adapter.config, trained=True)
        return self.adapter
