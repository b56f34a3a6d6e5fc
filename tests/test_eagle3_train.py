"""The EAGLE-3 trainer (flexdraft_sgl.eagle3.train, `flexdraft train-eagle3`) and its draft module (eagle3.model), on
tiny random Llama targets:

- the module computes what SGLang's own LlamaForCausalLMEagle3 computes from the exported checkpoint, logit for
  logit, for committed rows (target features through fc) and draft steps on the KV cache (SGLang's model run in a
  subprocess with its attention kernel swapped for plain attention under the same mask);
- each training-time-test step k predicts exactly what the (k+1)-th draft of decoding predicts after the same
  committed tokens (and a decoding whose draft steps miss their own earlier keys would not);
- training lowers the loss, raises the accepted drafts, resumes step for step, and `flexdraft train-eagle3` reruns to
  resume and exports the checkpoint;
- the trained head served by SGLang's EAGLE3 on CPU gives exactly plain SGLang's greedy output, accepting the drafts
  the module predicts (SGLang's default capture of target layers, for an 8-layer target).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_prompts, tiny_target
from sglang_harness import engine_env
from test_sglang_eagle_cpu import CHAIN, MAX_NEW, eagle3_args, greedy_requests, needs_cpu_sglang, serve
from test_train_pipeline import CharTokenizer, sharegpt_prompts_from

from flexdraft_sgl.eagle3 import Eagle3Draft
from flexdraft_sgl.eagle3.train import Eagle3Trainer, Eagle3TrainConfig, target_features, ttt_outputs
from flexdraft_sgl.reference import ReferenceEngine
from flexdraft_sgl.train.data import DataConfig, Sample, frequent_tokens, load_samples, prepare_data

VOCAB = 8  # a small vocabulary: a tiny head learns enough of a random target for drafts to be accepted


def samples_of(model, count: int, seed: int, vocab: int = VOCAB) -> list[Sample]:
    """Self-distilled samples: random prompts answered by the target's greedy decoding."""
    prompts = random_prompts(count, vocab, seed=seed, min_len=3, max_len=8)
    results = ReferenceEngine(model).generate(prompts, max_new_tokens=24, mode="plain")
    return [Sample(i, p, r.tokens) for i, (p, r) in enumerate(zip(prompts, results))]


# ---------------------------------------------------------------------------------------------------------------------
# The module against SGLang's model

SGLANG_FORWARD = r'''
"""SGLang's LlamaForCausalLMEagle3 on CPU in one process: argv = head folder, inputs .pt, outputs .pt, port."""
import sys
from types import SimpleNamespace

import torch

torch.set_num_threads(1)
from flexdraft_sgl.sglang.cpu import install

install()
from safetensors.torch import load_file
from sglang.srt.distributed.bootstrap import _init_parallel_groups
from sglang.srt.runtime_context import SpawnRanks, publish
from sglang.srt.server_args import ServerArgs
from torch.nn.functional import scaled_dot_product_attention
from transformers import AutoConfig

head, inputs_path, outputs_path, port = sys.argv[1:5]
inputs = torch.load(inputs_path)
args = ServerArgs(model_path=inputs["target"], device="cpu", attention_backend="torch_native", dtype="float32",
                  speculative_algorithm="EAGLE3", speculative_draft_model_path=head, speculative_num_steps=3,
                  speculative_eagle_topk=1, speculative_num_draft_tokens=4)
publish(args, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))
_init_parallel_groups(backend="gloo", dist_init_method=f"tcp://127.0.0.1:{port}", server_args=args, gpu_id=0)
from sglang.srt.models.llama_eagle3 import LlamaForCausalLMEagle3

config = AutoConfig.from_pretrained(head)
model = LlamaForCausalLMEagle3(config)
model.load_weights(load_file(f"{head}/model.safetensors").items())


class CachedAttention(torch.nn.Module):
    """Stands in for RadixAttention (whose kernels need SGLang's KV pools): attention over a KV cache kept here,
    under the call's mask."""

    def __init__(self, heads, kv_heads, dim):
        super().__init__()
        self.heads, self.kv_heads, self.dim = heads, kv_heads, dim

    def forward(self, q, k, v, forward_batch, **_):
        cache = forward_batch.cache
        cache["k"], cache["v"] = torch.cat([cache.get("k", k[:0]), k]), torch.cat([cache.get("v", v[:0]), v])
        split = lambda x, h: x.view(-1, h, self.dim).transpose(0, 1)  # noqa: E731
        out = scaled_dot_product_attention(split(q, self.heads), split(cache["k"], self.kv_heads),
                                           split(cache["v"], self.kv_heads), attn_mask=forward_batch.mask,
                                           enable_gqa=True)
        return out.transpose(0, 1).flatten(1)


model.model.layers[0].self_attn.attn = CachedAttention(config.num_attention_heads, config.num_key_value_heads,
                                                       config.head_dim)
cache, results = {}, []
with torch.no_grad():
    for call in inputs["calls"]:
        batch = SimpleNamespace(spec_info=SimpleNamespace(hidden_states=call["hidden"]), mask=call["mask"],
                                cache=cache)
        normed, (aux,) = model.model(None, call["positions"], batch, input_embeds=call["embeds"])
        logits = normed @ model.lm_head.weight[: config.draft_vocab_size].T  # what its LogitsProcessor computes
        results.append({"logits": logits, "h": aux})
torch.save({"calls": results, "hot": model.hot_token_id}, outputs_path)
'''


def sglang_forward(head_dir: Path, target_dir: Path, calls: list[dict], tmp_path: Path) -> dict:
    (tmp_path / "sglang_forward.py").write_text(SGLANG_FORWARD)
    torch.save({"target": str(target_dir), "calls": calls}, tmp_path / "in.pt")
    with socket.socket() as s:  # a free port for the single-process gloo group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, str(tmp_path / "sglang_forward.py"), str(head_dir), str(tmp_path / "in.pt"),
                          str(tmp_path / "out.pt"), str(port)], env=engine_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return torch.load(tmp_path / "out.pt")


def test_the_module_computes_what_sglangs_eagle3_model_computes(tmp_path):
    model = tiny_target("llama", vocab=16, layers=8, seed=0)
    model.save_pretrained(tmp_path / "target")
    draft = Eagle3Draft(model.config, 10).randomize(seed=1, std=0.3)
    draft.save(tmp_path / "head")
    draft = Eagle3Draft.load(tmp_path / "head", model.config)  # what was written is what is compared
    embedding = model.get_input_embeddings().weight
    tokens = torch.randint(0, 16, (12,), generator=torch.Generator().manual_seed(0))
    features, _ = target_features(model, tokens, draft.captured)

    # committed rows 0..6 (fc of the target's features), then two draft steps on the KV cache: each reads the
    # previous row's output h and sees every earlier row
    c = 7
    with torch.no_grad():
        h, cache = draft(embedding[tokens[1:c + 1]], draft.fuse(features[:c]), torch.arange(c))
        calls = [{"embeds": embedding[tokens[1:c + 1]], "hidden": features[:c], "positions": torch.arange(c),
                  "mask": torch.ones(c, c, dtype=torch.bool).tril()}]
        ours = [(draft.logits(h), h)]
        for step in range(2):
            row = embedding[tokens[c + 1 + step: c + 2 + step]]
            calls.append({"embeds": row, "hidden": ours[-1][1][-1:], "positions": torch.tensor([c + step]),
                          "mask": torch.ones(1, c + 1 + step, dtype=torch.bool)})
            h, cache = draft(row, ours[-1][1][-1:], torch.tensor([c + step]), cache)
            ours.append((draft.logits(h), h))
    theirs = sglang_forward(tmp_path / "head", tmp_path / "target", calls, tmp_path)
    assert torch.equal(theirs["hot"], draft.hot)
    for (logits, h), their in zip(ours, theirs["calls"]):
        assert logits.std() > 0.1
        torch.testing.assert_close(their["logits"], logits, rtol=1e-4, atol=1e-4)  # float32 summation order
        torch.testing.assert_close(their["h"], h, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Training-time test against decoding


def decoding_logits(draft, embedding, features, tokens, committed: int, steps: int, see_drafts: bool = True):
    """Logits of the `steps` drafts decoding computes once tokens[:committed + 1] are committed, fed the true tokens
    (as training is) rather than its own drafts. see_drafts=False: draft steps see the committed KV only."""
    c = committed
    h, cache = draft(embedding[tokens[1:c + 1]], draft.fuse(features[:c]), torch.arange(c))
    hidden, out = h[-1:], [draft.logits(h[-1:])[0]]
    for k in range(1, steps):
        mask = torch.ones(1, c + k, dtype=torch.bool)
        mask[0, c:-1] = see_drafts
        hidden, cache = draft(embedding[tokens[c + k: c + k + 1]], hidden, torch.tensor([c - 1 + k]), cache, mask)
        out.append(draft.logits(hidden)[0])
    return out


@torch.no_grad()
def test_each_ttt_step_predicts_what_that_draft_step_of_decoding_predicts():
    model = tiny_target("llama", vocab=16, layers=8, seed=0)
    draft = Eagle3Draft(model.config, 12).randomize(seed=1, std=0.3)
    embedding = model.get_input_embeddings().weight
    tokens = torch.randint(0, 16, (16,), generator=torch.Generator().manual_seed(0))
    features, _ = target_features(model, tokens, draft.captured)
    hidden_states = model(tokens[None], output_hidden_states=True).hidden_states  # [i]: the input of layer i
    assert torch.equal(features, torch.cat([hidden_states[i][0] for i in (2, 4, 5)], -1))  # SGLang's default, L = 8

    steps = 4
    trained = [logits for _, logits in ttt_outputs(draft, embedding, features, tokens, steps)]
    blind = 0.0
    for c in range(1, len(tokens) - steps):  # row p = c - 1 of each step
        decoded = decoding_logits(draft, embedding, features, tokens, c, steps)
        for k in range(steps):
            torch.testing.assert_close(trained[k][c - 1], decoded[k], rtol=1e-5, atol=1e-5)
        stock = decoding_logits(draft, embedding, features, tokens, c, steps, see_drafts=False)
        blind = max(blind, max((trained[k][c - 1] - stock[k]).abs().max().item() for k in range(2, steps)))
    assert blind > 1e-2  # the comparison does see which draft keys a step attends to

    # and the greedy chain SGLang drafts is the TTT's argmax along the chain's own tokens
    committed = tokens[:9].tolist()
    chain = draft.draft_chain(embedding, features, committed, steps)
    along = torch.tensor(committed + chain)
    outs = ttt_outputs(draft, embedding, target_features(model, along, draft.captured)[0], along, steps)
    assert [int(draft.hot[logits[len(committed) - 2].argmax()]) for _, logits in outs] == chain


def test_the_draft_vocabulary_is_the_most_frequent_response_tokens():
    samples = [Sample(0, [7, 7, 7, 9], [3, 3, 5, 1]), Sample(1, [9], [5, 3, 2])]
    assert frequent_tokens(samples, 12, 3).tolist() == [1, 3, 5]  # 3 (x3), 5 (x2), then 1 and 2 tie: lower id
    assert frequent_tokens(samples, 12, 6).tolist() == [1, 2, 3, 5, 7, 9]  # then the prompts' tokens
    assert frequent_tokens(samples, 12, 8).tolist() == [0, 1, 2, 3, 4, 5, 7, 9]  # then the lowest ids
    with pytest.raises(ValueError, match="larger"):
        frequent_tokens(samples, 12, 13)


# ---------------------------------------------------------------------------------------------------------------------
# Training


CONFIG = Eagle3TrainConfig(steps=150, sequences_per_step=4, draft_vocab=6, lr=5e-3, warmup_steps=5,
                           checkpoint_every=50, seed=0)


@torch.no_grad()
def greedy_with_drafts(model, draft, prompt: list[int], steps: int = 3) -> tuple[list[int], list[int]]:
    """Greedy output (MAX_NEW tokens) and accepted-draft histogram of SGLang's EAGLE3 chain with this head: verify the
    chain, keep the drafts up to the first miss and the target's token after them."""
    embedding = model.get_input_embeddings().weight
    out, accepted = [int(model(torch.tensor([prompt])).logits[0, -1].argmax())], []
    while len(out) < MAX_NEW:
        committed = prompt + out
        features, _ = target_features(model, torch.tensor(committed[:-1]), draft.captured)
        drafts = draft.draft_chain(embedding, features, committed, steps)
        predicted = model(torch.tensor([committed + drafts])).logits[0, -steps - 1:].argmax(-1).tolist()
        a = next((i for i in range(steps) if drafts[i] != predicted[i]), steps)
        accepted.append(a)
        out += predicted[: a + 1]
    return out[:MAX_NEW], [accepted.count(a) for a in range(max(accepted) + 1)]


def accepted_drafts(model, draft, prompts) -> int:
    return sum(sum(a * n for a, n in enumerate(greedy_with_drafts(model, draft, p)[1])) for p in prompts)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An 8-layer target (SGLang's default aux layers 2, 4, 5 are distinct), trained with its head; as folders."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eagle3-train")
    model = tiny_target("llama", vocab=VOCAB, layers=8, seed=3)
    model.save_pretrained(root / "target")
    samples = samples_of(model, 64, seed=1)
    trainer = Eagle3Trainer(model, samples, root / "run", CONFIG, progress=False)
    start = Eagle3Draft(model.config, CONFIG.draft_vocab)
    start.load_state_dict(trainer.draft.state_dict())
    trainer.run().save(root / "eagle3")
    return model, samples, trainer, start, str(root / "target"), str(root / "eagle3")


def test_training_lowers_the_loss_raises_acceptance_and_resumes_exactly(trained, tmp_path):
    model, samples, whole, start, _, head_dir = trained
    losses = whole.losses
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10, losses
    log = [json.loads(line) for line in (whole.out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, CONFIG.steps + 1))
    late = lambda key: sum(r[key] for r in log[-10:]) / 10  # noqa: E731
    assert late("acc0") > 0.5 and late("acc2") > 0.4  # top-1 agreement of draft steps 0 and 2 with the target

    loaded = Eagle3Draft.load(head_dir, model.config)
    assert torch.equal(loaded.hot, whole.draft.hot)
    assert sorted(loaded.hot.tolist()) == frequent_tokens(samples, VOCAB, CONFIG.draft_vocab).tolist()
    held_out = random_prompts(8, VOCAB, seed=4, max_len=12)
    assert accepted_drafts(model, loaded, held_out) > 1.5 * accepted_drafts(model, start, held_out)  # 104 vs 52

    # interrupted after 65 steps (the checkpoint of step 50 survives), then resumed: the same run, step for step
    part = Eagle3Trainer(model, samples, tmp_path, CONFIG, progress=False)
    features = part.features()
    for _ in range(65):
        part.train_step(features)
        if part.step % CONFIG.checkpoint_every == 0:
            part.save_checkpoint()
    resumed = Eagle3Trainer(model, samples, tmp_path, CONFIG, progress=False)
    assert resumed.step == 50
    resumed.run()
    assert resumed.losses == pytest.approx(losses, rel=1e-5)
    for name, value in whole.draft.state_dict().items():
        torch.testing.assert_close(resumed.draft.state_dict()[name], value, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match="other settings"):
        Eagle3Trainer(model, samples, tmp_path, Eagle3TrainConfig(steps=151, draft_vocab=6), progress=False)


def test_the_cli_trains_resumes_by_rerunning_and_exports(tmp_path, monkeypatch):
    from flexdraft_sgl import cli
    from flexdraft_sgl.reference import hf

    model = tiny_target("llama", vocab=32, layers=4, seed=0)
    data = prepare_data(ReferenceEngine(model), CharTokenizer(32), sharegpt_prompts_from(20), tmp_path / "data",
                        DataConfig(num_prompts=8, max_prompt_tokens=14, max_new_tokens=8, batch_size=4),
                        progress=False)
    monkeypatch.setattr(hf, "load_target", lambda path, dtype="float32": (model, None, path))
    out = tmp_path / "run"
    command = ["train-eagle3", "--data", str(data), "--out", str(out), "--model", "tiny", "--steps", "6",
               "--checkpoint-every", "4", "--draft-vocab", "20", "--aux-layers", "0,1,2", "--ttt-steps", "2",
               "--threads", "1", "--save-dtype", "float32"]
    assert cli.main(command) == 0
    first = (out / "log.jsonl").read_text()
    assert len(first.splitlines()) == 6
    head = Eagle3Draft.load(out / "eagle3", model.config)
    config = json.loads((out / "eagle3" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 20
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1, 2] and head.captured == [1, 2, 3]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["samples"] == len(load_samples(data)) and summary["config"]["ttt_steps"] == 2

    assert cli.main(command) == 0  # rerun: resumes at the end, trains nothing more
    assert (out / "log.jsonl").read_text() == first
    assert cli.main([*command[:-2], "--save-dtype", "bfloat16", "--steps", "7"]) == 2  # other settings: refused


# ---------------------------------------------------------------------------------------------------------------------
# Served by SGLang


@needs_cpu_sglang
def test_the_trained_head_serves_in_sglang_exactly_and_accepts_as_predicted(trained):
    model, _, _, _, model_dir, head_dir = trained
    prompts = random_prompts(16, VOCAB, seed=5, max_len=12)
    plain = [o["output_ids"] for o in serve(model_dir, [], greedy_requests(prompts))[0]]
    outputs, info = serve(model_dir, eagle3_args(head_dir, CHAIN), greedy_requests(prompts))
    assert [o["output_ids"] for o in outputs] == plain

    draft = Eagle3Draft.load(head_dir, model.config)
    expected = [greedy_with_drafts(model, draft, p) for p in prompts]
    assert [tokens for tokens, _ in expected] == plain
    assert [o["meta_info"]["spec_correct_drafts_histogram"] for o in outputs] == [hist for _, hist in expected]
    assert sum(sum(a * n for a, n in enumerate(hist)) for _, hist in expected) > 40  # drafts accepted
    assert info["internal_states"][0]["avg_spec_accept_length"] > 1
