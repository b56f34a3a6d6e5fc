"""`flexdraft train-eagle3`: an EAGLE-3 head for a frozen Llama target, on the self-distilled data FlexDraft trains
on (`flexdraft prepare-data`), with FlexDraft's trainer plumbing (`train.trainer`: batches as functions of (seed,
step), the cosine schedule, atomic checkpoints, log.jsonl, the progress bar, train_summary.json).

Training-time test (TTT) over K draft steps, as EAGLE-3 trains and SGLang decodes. For a sequence x_0..x_{L-1} the
head has rows p = 0..L-2; at step k row p sits at position p + k, reads token x_{p+1+k} and predicts x_{p+2+k}:
- step 0 reads fc of the target's features at p (the inputs of the captured target layers, `captured_layers`);
- step k > 0 reads the head's own step k - 1 output of row p (what a draft step reads in decoding);
- row p at step k attends to the step-0 keys of rows 0..p (the committed prefix: SGLang's KV cache holds them,
  computed from target features) and to its own keys of steps 1..k (the earlier draft steps of that chain), which is
  exactly the context of the (k+1)-th draft after committing x_0..x_{p+1} (`Eagle3Draft.draft_chain`).
The loss of step k is the cross-entropy to the target's next-token distribution restricted to the draft vocabulary
and renormalised (forward KL up to a constant), weighted loss_decay ** k and averaged over the batch's rows that are
decoding states (x_{p+1} is a response token: decoding drafts once the prefill's token is committed) and whose token
to predict is in the draft vocabulary. The draft vocabulary is the `draft_vocab` most frequent response tokens. The
head starts from random weights, N(0, initializer_range), and unit norms (a start from the target's LM-head rows made
the first drafts confidently wrong: twice the loss of a uniform guess on SmolLM2, and no faster later).

The target runs once per sample: its captured features (bfloat16) and last hidden state (float32, for the target's
distribution) are cached in OUT/features.pt.

Output folder:
  checkpoint.pt        latest training state (resume by rerunning the same command)
  features.pt          cached target features of every sample
  log.jsonl            one line per step: step, loss, lr, seconds, acc<k> (draft step k's top-1 agreement)
  eagle3/              the trained head, as SGLang loads it (--speculative-algorithm EAGLE3
                       --speculative-draft-model-path OUT/eagle3)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..train.data import Sample, frequent_tokens
from ..train.trainer import atomic_save, batch_for_step, cosine_schedule, load_checkpoint, run_steps
from .model import Eagle3Draft

# What checkpoint.pt and features.pt hold; a change of meaning bumps it and old files are refused / recomputed.
FORMAT = "eagle3-ttt/v1"


@dataclass(frozen=True)
class Eagle3TrainConfig:
    steps: int = 2000
    sequences_per_step: int = 4
    max_length: int = 512  # tokens per training sequence (prompt + response), longer ones are cut
    ttt_steps: int = 3
    draft_vocab: int = 8192
    lr: float = 5e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    loss_decay: float = 0.8  # weight of draft step k is loss_decay ** k
    checkpoint_every: int = 100
    seed: int = 0
    aux_layer_ids: tuple[int, ...] | None = None  # None: SGLang's default capture

    def __post_init__(self):
        if self.steps < 1 or self.ttt_steps < 1 or self.sequences_per_step < 1 or self.draft_vocab < 1:
            raise ValueError("steps, ttt_steps, sequences_per_step and draft_vocab must be at least 1")


def learning_rate(config: Eagle3TrainConfig, step: int) -> float:
    return cosine_schedule(config.lr, step, config.warmup_steps, config.steps)


@torch.no_grad()
def target_features(model, tokens: Tensor, captured: list[int]) -> tuple[Tensor, Tensor]:
    """The target over one sequence: [n, len(captured) * H] the inputs of the captured layers (the residual stream
    entering them, what SGLang captures), and [n, H] the last hidden state after the final norm (the LM head's
    input)."""
    inputs = {}
    hooks = [model.model.layers[i].register_forward_pre_hook(
        lambda _module, args, kwargs, i=i: inputs.__setitem__(i, (args[0] if args else kwargs["hidden_states"])[0]),
        with_kwargs=True) for i in captured]
    try:
        last = model.model(input_ids=tokens[None]).last_hidden_state[0]
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([inputs[i] for i in captured], -1), last


def ttt_attention(q: Tensor, keys: list[Tensor], values: list[Tensor]) -> Tensor:
    """Attention of TTT step k = len(keys) - 1 for rows p = 0..n-1: q [heads, n, d]; keys/values[j] [kv_heads, n, d]
    of step j. Row p sees step 0's rows 0..p (causal) and its own row at steps 1..k (the diagonal)."""
    group = q.shape[0] // keys[0].shape[0]
    keys, values = [k.repeat_interleave(group, 0) for k in keys], [v.repeat_interleave(group, 0) for v in values]
    n, scale = q.shape[1], q.shape[-1] ** -0.5
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    scores = [(q @ keys[0].transpose(1, 2) * scale).masked_fill(~causal, float("-inf"))]
    scores += [(q * k).sum(-1, keepdim=True) * scale for k in keys[1:]]
    weights = torch.cat(scores, -1).softmax(-1)
    out = weights[..., :n] @ values[0]
    for j, v in enumerate(values[1:]):
        out = out + weights[..., n + j: n + j + 1] * v
    return out


def ttt_outputs(draft: Eagle3Draft, embedding: Tensor, features: Tensor, tokens: Tensor, steps: int
                ) -> list[tuple[Tensor, Tensor]]:
    """(h, logits) of each TTT step for rows p = 0..L-2 of one sequence (`tokens` [L], `features` [L, n_aux * H]).
    Rows whose token lies past the end (p > L - 2 - k at step k) read token 0; nothing valid attends to them."""
    n = len(tokens) - 1
    padded = torch.cat([tokens, tokens.new_zeros(steps)])
    positions = torch.arange(n, device=tokens.device)
    hidden = draft.fuse(features[:n])
    keys, values, out = [], [], []
    for k in range(steps):
        q, key, value = draft.project(embedding[padded[1 + k: 1 + k + n]], hidden, positions + k)
        keys.append(key)
        values.append(value)
        hidden = draft.finish(ttt_attention(q, keys, values), hidden)
        out.append((hidden, draft.logits(hidden)))
    return out


class Eagle3Trainer:
    def __init__(self, model, samples: list[Sample], out_dir: str | Path, config: Eagle3TrainConfig,
                 progress: bool = True):
        if not samples:
            raise ValueError("no training samples")
        self.config, self.out, self.progress, self.samples = config, Path(out_dir), progress, samples
        self.out.mkdir(parents=True, exist_ok=True)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        device = next(model.parameters()).device
        self.sequences = [torch.tensor(s.tokens[: config.max_length], device=device) for s in samples]
        self.prompt_lengths = [len(s.prompt_ids) for s in samples]
        self.embedding = model.get_input_embeddings().weight.float()
        vocabulary = frequent_tokens(samples, model.config.vocab_size, config.draft_vocab)
        aux = None if config.aux_layer_ids is None else list(config.aux_layer_ids)
        self.draft = Eagle3Draft(model.config, config.draft_vocab, aux).to(device)
        self.draft.randomize(config.seed, getattr(model.config, "initializer_range", 0.02))
        self.draft.set_vocabulary(vocabulary)
        self.target_head = model.get_output_embeddings().weight[self.draft.hot].float()  # target logits, draft vocab
        self.to_draft = torch.full((model.config.vocab_size,), -1, dtype=torch.long, device=device)
        self.to_draft[self.draft.hot] = torch.arange(config.draft_vocab, device=device)
        self.optimizer = torch.optim.AdamW(self.draft.parameters(), lr=config.lr, betas=(0.9, 0.95),
                                           weight_decay=config.weight_decay)
        self.step, self.losses, self.seconds = 0, [], 0.0
        self._resume()

    # ---- state -------------------------------------------------------------------------------------------------
    def _state_key(self) -> dict:
        return {"format": FORMAT, "config": asdict(self.config), "sample_indices": [s.index for s in self.samples],
                "target": self.model.config.name_or_path}

    def _resume(self) -> None:
        state = load_checkpoint(self.out / "checkpoint.pt", self._state_key())
        if state is not None:
            self.draft.load_state_dict(state["draft"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.step, self.losses, self.seconds = state["step"], state["losses"], state["seconds"]

    def save_checkpoint(self) -> None:
        atomic_save({"key": self._state_key(), "draft": self.draft.state_dict(),
                     "optimizer": self.optimizer.state_dict(), "step": self.step, "losses": self.losses,
                     "seconds": self.seconds}, self.out / "checkpoint.pt")

    @torch.no_grad()
    def features(self) -> list[tuple[Tensor, Tensor]]:
        """Each sample's (captured features in bfloat16, last hidden state), from the cache or computed once."""
        from tqdm import tqdm

        path = self.out / "features.pt"
        key = {"format": FORMAT, "target": self.model.config.name_or_path, "captured": self.draft.captured,
               "lengths": [len(x) for x in self.sequences], "indices": [s.index for s in self.samples],
               "dtype": str(self.model.dtype)}
        if path.exists():
            cached = torch.load(path, weights_only=False)
            if cached["key"] == key:
                return cached["features"]
        out = []
        for tokens in tqdm(self.sequences, desc="target features", unit="seq", disable=not self.progress):
            features, last = target_features(self.model, tokens, self.draft.captured)
            out.append((features.to("cpu", torch.bfloat16), last.to("cpu", torch.float32)))
        atomic_save({"key": key, "features": out}, path)
        return out

    # ---- the loop ----------------------------------------------------------------------------------------------
    def _targets(self, i: int) -> tuple[Tensor, Tensor]:
        """Per step k: (which rows p count: x_{p+2+k} exists, row p is a decoding state and x_{p+2+k} is in the draft
        vocabulary, [K, n] bool; x_{p+2+k} as a draft id, [K, n], -1 where not in the vocabulary)."""
        tokens, k_max = self.sequences[i], self.config.ttt_steps
        p = torch.arange(len(tokens) - 1, device=tokens.device)[None]
        t = p + 2 + torch.arange(k_max, device=tokens.device)[:, None]
        ids = self.to_draft[torch.cat([tokens, tokens.new_zeros(k_max + 1)])[t]]
        # Decoding drafts once x_0..x_{p+1} are committed, the first response token x_P (from prefill) among them.
        valid = (t < len(tokens)) & (p >= self.prompt_lengths[i] - 1) & (ids >= 0)
        return valid, ids

    def train_step(self, features: list[tuple[Tensor, Tensor]]) -> tuple[float, dict]:
        c = self.config
        started = time.perf_counter()
        indices = batch_for_step(c, len(self.sequences), self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(c, self.step)
        targets = {i: self._targets(i) for i in indices}
        counts = sum(valid.sum(1) for valid, _ in targets.values()).clamp(min=1)  # rows per step, whole batch
        self.optimizer.zero_grad(set_to_none=True)
        total, correct = 0.0, torch.zeros(c.ttt_steps)
        device = self.embedding.device
        for i in indices:  # one sequence at a time: each step's loss is a mean over the batch's rows, so backward now
            valid, ids = targets[i]
            aux, last = (x.to(device, torch.float32) for x in features[i])
            tokens = self.sequences[i]
            target_logp = (last @ self.target_head.T).log_softmax(-1)  # [L, V_draft]
            loss = 0.0
            for k, (_, logits) in enumerate(ttt_outputs(self.draft, self.embedding, aux, tokens, c.ttt_steps)):
                rows = valid[k].nonzero().flatten()
                if len(rows) == 0:
                    continue
                p_target = target_logp[rows + 1 + k].exp()  # the target's distribution after x_{p+1+k}
                ce = -(p_target * logits[rows].log_softmax(-1)).sum()
                loss = loss + c.loss_decay ** k * ce / counts[k]
                correct[k] += (logits[rows].argmax(-1) == ids[k, rows]).sum().item()
            if torch.is_tensor(loss):
                loss.backward()
                total += loss.item()
        torch.nn.utils.clip_grad_norm_(self.draft.parameters(), 1.0)
        self.optimizer.step()
        self.step += 1
        self.losses.append(total)
        self.seconds += time.perf_counter() - started
        accuracy = {f"acc{k}": round(float(correct[k] / counts[k]), 4) for k in range(c.ttt_steps)}
        return total, accuracy

    def run(self) -> Eagle3Draft:
        """Train to the end (from the last checkpoint); the trained head."""
        c = self.config
        features = self.features()
        run_steps(self, lambda: self.train_step(features), c.steps, c.checkpoint_every,
                  lambda step: learning_rate(c, step), self.progress)
        return self.draft

