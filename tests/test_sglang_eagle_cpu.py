"""SGLang's EAGLE3 on CPU (patches/eagle_torch_native_draft.py) and sampled EAGLE-family verification there
(patches/eagle_cpu_sampling.py with the shim's tree_speculative_sampling_target_only), on tiny random Llama targets with
randomly initialised EAGLE-3 heads written by flexdraft_sgl.eagle3.

- greedy EAGLE3 (chain and tree) equals plain SGLang for 24 concurrent prompts, and the chain accepts exactly as many
  drafts per step as the head recomputed in plain torch from its checkpoint files predicts;
- every chain draft SGLang proposes is the reference head's, for a head whose drafts hinge on the draft steps'
  attention (SGLang's relaxed acceptance threshold 0 makes every draft part of the output);
- the tree sampling op keeps the target distribution (chi-square, fixed seed; a relaxed acceptance fails the same
  check), and NGRAM and EAGLE3 servers at temperature 1 sample the target's exact distribution while greedy requests
  in the same batches stay greedy; rejection sampling, which needs Triton, is refused at start-up.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import hf_greedy, random_prompts, tiny_target
from safetensors.torch import load_file, save_file
from test_engine_sampling import PROMPT, VOCAB, min_pvalue
from torch.nn.functional import scaled_dot_product_attention, silu

from flexdraft_sgl.eagle3 import save_random_eagle3
from flexdraft_sgl.sglang.cpu.sgl_kernel_shim import sgl_kernel as shim
from flexdraft_sgl.sglang.launch import SGLangServer, default_server_args

needs_cpu_sglang = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU support is off on a GPU machine")

MAX_NEW, ALPHA = 32, 1e-3
AUX_LAYERS = [0, 1, 2]  # a 4-layer target: SGLang's default (inputs of layers 2, L // 2, L - 3) would repeat layer 2
CHAIN = ["--speculative-num-steps", "3", "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4"]
TREE = ["--speculative-num-steps", "3", "--speculative-eagle-topk", "2", "--speculative-num-draft-tokens", "5"]


@pytest.fixture(scope="module")
def greedy(tmp_path_factory):
    """An 8-token target, on which a random head's drafts are right often enough, and a head that proposes 6 of its
    tokens (through d2t), as folders."""
    root = tmp_path_factory.mktemp("eagle3-greedy")
    model = tiny_target("llama", vocab=VOCAB, seed=3)
    model.save_pretrained(root / "target")
    save_random_eagle3(model.config, root / "eagle3", draft_vocab_size=6, aux_layer_ids=AUX_LAYERS, seed=1, std=0.3)
    return model, str(root / "target"), str(root / "eagle3")


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(24, VOCAB, seed=4, max_len=12)


def eagle3_args(head_dir: str, shape: list[str]) -> list[str]:
    # --decode-log-interval 1: /server_info folds accept lengths in only when SGLang logs a decode step
    return ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", head_dir, *shape,
            "--decode-log-interval", "1"]


def serve(model_dir: str, extra: list[str], requests: list[dict], workers: int = 16):
    """Responses to `requests` (bodies for /generate) sent concurrently, and /server_info, from one fresh server."""
    args = default_server_args(model_dir, max_total_tokens=4096) + ["--skip-tokenizer-init", *extra]
    with SGLangServer(args) as server:
        with ThreadPoolExecutor(workers) as pool:
            outputs = list(pool.map(lambda body: server.post("/generate", body), requests))
        return outputs, server.get("/server_info")


def greedy_requests(prompts):
    params = {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
    return [{"input_ids": p, "sampling_params": params} for p in prompts]


@pytest.fixture(scope="module")
def plain(greedy, prompts):
    _, model_dir, _ = greedy
    return [o["output_ids"] for o in serve(model_dir, [], greedy_requests(prompts))[0]]


# ---------------------------------------------------------------------------------------------------------------------
# The checkpoint helper and a reference for its heads


class Eagle3Reference:
    """SGLang's greedy EAGLE-3 chain (topk 1) recomputed in plain torch from the checkpoint files: each draft row p
    reads the embedding of token p + 1 and, for committed rows, fc of the target's aux features at p (Hugging Face
    hidden states), for draft rows the head's own output at p - 1; one causal decoder layer over all rows, no cache."""

    def __init__(self, target, head_dir: str, drafts_see_drafts: bool = True):
        self.target, self.w = target, load_file(str(Path(head_dir) / "model.safetensors"))
        self.drafts_see_drafts = drafts_see_drafts
        cfg = json.loads((Path(head_dir) / "config.json").read_text())
        self.aux = cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
        self.heads, self.kv_heads, self.dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
        self.eps, self.theta = cfg["rms_norm_eps"], cfg["rope_parameters"]["rope_theta"]
        self.hot = self.w["d2t"] + torch.arange(len(self.w["d2t"]))

    def _norm(self, x, name):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.w[f"{name}.weight"]

    def _rope(self, x):  # [rows, heads, dim], positions 0..rows-1, rotate-half
        freqs = torch.arange(len(x))[:, None] / self.theta ** (torch.arange(0, self.dim, 2) / self.dim)
        cos, sin = torch.cat([freqs.cos()] * 2, -1)[:, None], torch.cat([freqs.sin()] * 2, -1)[:, None]
        half = self.dim // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def _head(self, tokens: list[int], hidden: torch.Tensor, committed_rows: int):
        w, rows = self.w, len(tokens)
        mask = torch.ones(rows, rows, dtype=torch.bool).tril()
        if not self.drafts_see_drafts:  # what the stock torch_native forward_decode does: committed KV only
            mask[committed_rows:, committed_rows:] = False
        embeds = self.target.model.embed_tokens.weight[torch.tensor(tokens)]
        x = torch.cat([self._norm(embeds, "midlayer.input_layernorm"), self._norm(hidden, "midlayer.hidden_norm")], -1)
        q, k, v = (x @ w[f"midlayer.self_attn.{n}_proj.weight"].T for n in "qkv")
        q, k = self._rope(q.view(rows, self.heads, self.dim)), self._rope(k.view(rows, self.kv_heads, self.dim))
        att = scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1),
                                           v.view(rows, self.kv_heads, self.dim).transpose(0, 1), attn_mask=mask,
                                           enable_gqa=True).transpose(0, 1).reshape(rows, -1)
        h = att @ w["midlayer.self_attn.o_proj.weight"].T + hidden
        n = self._norm(h, "midlayer.post_attention_layernorm")
        h = h + (silu(n @ w["midlayer.mlp.gate_proj.weight"].T) * (n @ w["midlayer.mlp.up_proj.weight"].T)) @ \
            w["midlayer.mlp.down_proj.weight"].T
        return self._norm(h, "norm") @ w["lm_head.weight"].T, h

    @torch.no_grad()
    def drafts(self, committed: list[int], steps: int) -> list[int]:
        """The chain drafted after `committed`, whose last token (the bonus) is in no KV cache yet."""
        states = self.target(torch.tensor([committed[:-1]]), output_hidden_states=True).hidden_states
        hidden = torch.cat([states[i + 1][0] for i in self.aux], -1) @ self.w["fc.weight"].T
        tokens, out = committed[1:], []
        for _ in range(steps):
            logits, h = self._head(tokens, hidden, len(committed) - 1)
            out.append(int(self.hot[logits[-1].argmax()]))
            tokens, hidden = tokens + out[-1:], torch.cat([hidden, h[-1:]])
        return out

    @torch.no_grad()
    def generate(self, prompt: list[int], steps: int) -> tuple[list[int], list[int]]:
        """Greedy output (MAX_NEW tokens) and accepted-draft histogram, SGLang's way: verify the whole chain, keep
        the drafts up to the first miss and the target's token after them."""
        out, accepted = [int(self.target(torch.tensor([prompt])).logits[0, -1].argmax())], []
        while len(out) < MAX_NEW:
            drafts = self.drafts(prompt + out, steps)
            predicted = self.target(torch.tensor([prompt + out + drafts])).logits[0, -steps - 1:].argmax(-1).tolist()
            a = next((i for i in range(steps) if drafts[i] != predicted[i]), steps)
            accepted.append(a)
            out += predicted[: a + 1]
        return out[:MAX_NEW], [accepted.count(a) for a in range(max(accepted) + 1)]


def test_checkpoint_has_the_layout_sglang_loads(tmp_path):
    model = tiny_target("llama", vocab=16, layers=8)
    save_random_eagle3(model.config, tmp_path, draft_vocab_size=10)
    cfg, w = json.loads((tmp_path / "config.json").read_text()), load_file(str(tmp_path / "model.safetensors"))
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert cfg["draft_vocab_size"] == 10 and cfg["vocab_size"] == 16 and not cfg["tie_word_embeddings"]
    assert "eagle_config" not in cfg  # 8 layers: SGLang's default aux layers 2, 4, 5 are distinct
    assert w["fc.weight"].shape == (64, 3 * 64) and w["lm_head.weight"].shape == (10, 64)
    assert w["midlayer.self_attn.q_proj.weight"].shape == (64, 128)  # q/k/v read embedding and hidden side by side
    assert w["midlayer.self_attn.k_proj.weight"].shape == (32, 128)
    hot = w["d2t"] + torch.arange(10)
    assert hot.unique().numel() == 10 and w["t2d"].nonzero().flatten().tolist() == hot.tolist()
    with pytest.raises(ValueError, match="repeat"):
        save_random_eagle3(tiny_target("llama", layers=4).config, tmp_path / "default")
    with pytest.raises(ValueError, match="distinct"):
        save_random_eagle3(tiny_target("llama", layers=4).config, tmp_path / "last", aux_layer_ids=[0, 1, 3])


# ---------------------------------------------------------------------------------------------------------------------
# Greedy EAGLE3 in SGLang on CPU


@needs_cpu_sglang
def test_eagle3_chain_equals_plain_sglang_and_accepts_as_the_head_predicts(greedy, prompts, plain):
    model, model_dir, head_dir = greedy
    outputs, info = serve(model_dir, eagle3_args(head_dir, CHAIN), greedy_requests(prompts))
    assert [o["output_ids"] for o in outputs] == plain

    expected = [Eagle3Reference(model, head_dir).generate(p, steps=3) for p in prompts]
    assert [tokens for tokens, _ in expected] == plain
    assert [o["meta_info"]["spec_correct_drafts_histogram"] for o in outputs] == [hist for _, hist in expected]
    assert sum(sum(hist[1:]) for _, hist in expected) > 20  # drafts accepted
    assert all(o["meta_info"]["spec_accept_length"] >= 1 for o in outputs)  # accept lengths are reported
    assert info["internal_states"][0]["avg_spec_accept_length"] > 1


def make_attention_decisive(head_dir: str) -> None:
    """Tie q_proj to k_proj, so each row attends mostly to itself, and shrink fc, so the attention output rather than
    the target's features leads the residual stream: a draft step that misses its own KV then drafts other tokens.
    (A random head's drafts barely depend on what its draft steps attend to.)"""
    cfg, path = json.loads((Path(head_dir) / "config.json").read_text()), Path(head_dir) / "model.safetensors"
    w = load_file(str(path))
    k = w["midlayer.self_attn.k_proj.weight"].view(cfg["num_key_value_heads"], cfg["head_dim"], -1)
    group = cfg["num_attention_heads"] // cfg["num_key_value_heads"]  # query head i reads KV head i // group
    w["midlayer.self_attn.q_proj.weight"] = k.repeat_interleave(group, 0).flatten(0, 1)
    w["fc.weight"] = w["fc.weight"] * 0.1
    save_file(w, str(path))


@needs_cpu_sglang
def test_eagle3_drafts_are_the_heads_at_every_draft_step(greedy, prompts, tmp_path):
    """Relaxed acceptance with threshold 0 accepts every draft the target gives any probability (temperature 1), so
    each verify step outputs its three drafts and a sampled token: the drafts are compared with the reference head's
    for the same context, token for token. The stock torch_native decode (draft steps see the committed KV only)
    would draft differently at a good share of those steps."""
    model, model_dir, _ = greedy
    head_dir = str(save_random_eagle3(model.config, tmp_path / "eagle3", draft_vocab_size=6,
                                      aux_layer_ids=AUX_LAYERS, seed=1, std=0.3))
    make_attention_decisive(head_dir)
    params = {"max_new_tokens": MAX_NEW, "temperature": 1.0, "ignore_eos": True}
    outputs, _ = serve(model_dir, eagle3_args(head_dir, CHAIN) + ["--speculative-accept-threshold-single", "0"],
                       [{"input_ids": p, "sampling_params": params} for p in prompts])
    reference, stock = Eagle3Reference(model, head_dir), Eagle3Reference(model, head_dir, drafts_see_drafts=False)
    steps = stock_differs = 0
    for prompt, output in zip(prompts, outputs):
        out, verified = output["output_ids"], output["meta_info"]["spec_verify_ct"]
        assert output["meta_info"]["spec_correct_drafts_histogram"] == [0, 0, 0, verified]  # all drafts accepted
        for i in range(1, len(out), 4):  # after the prefill's token: three drafts and a sampled token per step
            drafts = reference.drafts(prompt + out[:i], 3)
            assert out[i: i + 3] == drafts[: len(out[i: i + 3])], (prompt, out, i)
            steps, stock_differs = steps + 1, stock_differs + (stock.drafts(prompt + out[:i], 3) != drafts)
    assert stock_differs > 0.2 * steps, (stock_differs, steps)


@needs_cpu_sglang
def test_eagle3_tree_equals_plain_sglang(greedy, prompts, plain):
    _, model_dir, head_dir = greedy
    outputs, _ = serve(model_dir, eagle3_args(head_dir, TREE), greedy_requests(prompts))
    assert [o["output_ids"] for o in outputs] == plain
    assert sum(o["meta_info"]["spec_num_correct_drafts"] for o in outputs) > 20


# ---------------------------------------------------------------------------------------------------------------------
# Tree speculative sampling


def test_tree_sampling_by_hand():
    # Root 0 with children 1 (token 0) and 2 (token 1); node 3 (token 2) under node 1.
    index, next_token, next_sibling = torch.tensor([[0, 1, 2, 3]]), torch.tensor([[1, 3, -1, -1]]), \
        torch.tensor([[-1, 2, -1, -1]])
    candidates = torch.tensor([[5, 0, 1, 2]])
    probs = torch.tensor([[[0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3], [0.3, 0.3, 0.4]]])
    cases = [  # root coin, final coin -> accepted nodes, emitted tokens
        (0.1, 0.99, [0, 1, 3], [0, 2, 2]),  # node 1 (u < 0.2), node 3 (0.5 < 0.8), then a draw from node 3's row
        (0.5, 0.5, [0, 2], [1, 1]),  # node 1 rejected, node 2 (u < 0.2 + 0.5), a leaf: a draw from its whole row
        (0.9, 0.1, [0], [2]),  # both rejected: the draw excludes tokens 0 and 1
    ]
    for coin, final_coin, nodes, tokens in cases:
        predicts, accepted = torch.zeros(4, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        accept_index = torch.full((1, 3), -1, dtype=torch.int32)
        shim.tree_speculative_sampling_target_only(
            predicts, accept_index, accepted, candidates, index, next_token, next_sibling,
            torch.tensor([[coin, 0.5, 0.5, 0.5]]), torch.tensor([final_coin]), probs, torch.zeros_like(probs))
        assert accept_index[0, : len(nodes)].tolist() == nodes and accepted.tolist() == [len(nodes) - 1]
        assert predicts[accept_index[0, : len(nodes)].long()].tolist() == tokens


class ToyTarget:
    """Next-token distributions over VOCAB that depend on the position (those past the tested tokens share one) and
    the last two tokens."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.a, self.b = torch.randn(8, VOCAB, VOCAB, generator=g) * 1.5, torch.randn(8, VOCAB, VOCAB, generator=g)

    def logits(self, ctx: list[int]) -> torch.Tensor:
        position = min(len(ctx), 7)
        return self.a[position, ctx[-1]] + self.b[position, ctx[-2]]

    def joint(self, prompt: list[int]) -> torch.Tensor:
        """[V, V, V] exact probability of the first three tokens after prompt."""
        p = lambda ctx: self.logits(ctx).double().softmax(-1)  # noqa: E731
        return torch.stack([torch.stack([p(prompt)[a] * p(prompt + [a])[b] * p(prompt + [a, b])
                                         for b in range(VOCAB)]) for a in range(VOCAB)])


def tree_sampled(target: ToyTarget, n: int, threshold_acc: float = 1.0, seed: int = 0):
    """n sequences of three tokens, each decoded by repeated calls of the op on a draft tree: root -> {1, 2},
    1 -> {3, 4}, siblings distinct (as EAGLE's top-k and NGRAM's trie give them), drafted from a tempered target.
    Returns the sequences and the number of drafts accepted and rejected."""
    g = torch.Generator().manual_seed(seed)
    parents, width = [None, 0, 0, 1, 1], 5
    index = torch.arange(n * width).view(n, width)
    next_token = torch.tensor([[1, 3, -1, -1, -1]]).expand(n, -1)
    next_sibling = torch.tensor([[-1, 2, -1, 4, -1]]).expand(n, -1)
    seqs, accepted_total, steps = [list(PROMPT) for _ in range(n)], 0, 0
    while min(len(s) for s in seqs) < len(PROMPT) + 3:
        candidates, probs = torch.zeros(n, width, dtype=torch.long), torch.zeros(n, width, VOCAB)
        for r, seq in enumerate(seqs):
            paths = [[]]
            for node in (1, 3):  # the first child of a node and its sibling: two distinct tokens
                pair = torch.multinomial((target.logits(seq + paths[parents[node]]) / 2).softmax(-1), 2,
                                         generator=g).tolist()
                candidates[r, node: node + 2] = torch.tensor(pair)
                paths += [paths[parents[node]] + [t] for t in pair]
            for node, path in enumerate(paths):
                probs[r, node] = target.logits(seq + path).softmax(-1)
        predicts, accepted = torch.zeros(n * width, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
        accept_index = torch.full((n, 3), -1, dtype=torch.int32)
        shim.tree_speculative_sampling_target_only(
            predicts, accept_index, accepted, candidates, index, next_token, next_sibling,
            torch.rand(n, width, generator=g), torch.rand(n, generator=g), probs, torch.zeros_like(probs),
            threshold_acc=threshold_acc)
        for r, seq in enumerate(seqs):
            seq += predicts[accept_index[r, : int(accepted[r]) + 1].long()].tolist()
        accepted_total, steps = accepted_total + int(accepted.sum()), steps + 1
    return torch.tensor([s[len(PROMPT): len(PROMPT) + 3] for s in seqs]), accepted_total, steps * n


def test_tree_sampling_keeps_the_target_distribution():
    target = ToyTarget()
    samples, accepted, trees = tree_sampled(target, 4000)
    assert 0 < accepted < 2 * trees  # drafts both accepted and rejected
    assert min_pvalue(samples, target.joint(list(PROMPT))) > ALPHA


def test_the_check_rejects_relaxed_acceptance():
    """Negative control: SGLang's relaxed acceptance (--speculative-accept-threshold-acc < 1) is lossy by design."""
    target = ToyTarget()
    samples, _, _ = tree_sampled(target, 4000, threshold_acc=0.3)
    assert min_pvalue(samples, target.joint(list(PROMPT))) < ALPHA


# ---------------------------------------------------------------------------------------------------------------------
# Temperature 1 in SGLang on CPU


@pytest.fixture(scope="module")
def sampling(tmp_path_factory):
    """A flat-ish 8-token target, whose three-token joint after PROMPT is enumerable, and an EAGLE-3 head."""
    root = tmp_path_factory.mktemp("eagle3-sampling")
    model = tiny_target("llama", vocab=VOCAB, layers=4, seed=1, init=0.15)
    model.save_pretrained(root / "target")
    save_random_eagle3(model.config, root / "eagle3", aux_layer_ids=AUX_LAYERS, seed=2, std=0.3)
    return model, str(root / "target"), str(root / "eagle3")


@torch.no_grad()
def exact_t1_joint(model) -> torch.Tensor:
    probs = lambda seq: model(torch.tensor([seq])).logits[0, -1].double().softmax(-1)  # noqa: E731
    return torch.stack([torch.stack([probs(PROMPT)[a] * probs(PROMPT + [a])[b] * probs(PROMPT + [a, b])
                                     for b in range(VOCAB)]) for a in range(VOCAB)])


@needs_cpu_sglang
@pytest.mark.parametrize("algorithm", ["NGRAM", "EAGLE3"])
def test_temperature_one_samples_the_target_distribution(sampling, algorithm):
    """About 2000 temperature-1 requests (the first three tokens against the exact joint, alpha 1e-4: batching makes
    the draws depend on timing, so the seed cannot pin them), every 42nd request greedy, in the same batches."""
    model, model_dir, head_dir = sampling
    extra = (eagle3_args(head_dir, ["--speculative-num-steps", "2", "--speculative-eagle-topk", "1",
                                    "--speculative-num-draft-tokens", "3"]) if algorithm == "EAGLE3" else
             ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "3"])
    sampled = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3, "temperature": 1.0, "ignore_eos": True}}
    greedy = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}}
    requests = [greedy if i % 42 == 0 else sampled for i in range(2048)]
    outputs, _ = serve(model_dir, extra + ["--random-seed", "0"], requests, workers=32)
    tokens = [o["output_ids"] for o in outputs]
    assert {tuple(t) for t, r in zip(tokens, requests) if r is greedy} == {tuple(hf_greedy(model, PROMPT, 3))}
    samples = torch.tensor([t for t, r in zip(tokens, requests) if r is sampled])
    assert min_pvalue(samples, exact_t1_joint(model)) > 1e-4
    drafts = [o["meta_info"]["spec_correct_drafts_histogram"] for o in outputs]
    assert sum(sum(h[1:]) for h in drafts) > 0 and sum(h[0] for h in drafts if h) > 0  # accepted and rejected


@needs_cpu_sglang
def test_rejection_sampling_is_refused_at_start_up(greedy):
    _, model_dir, head_dir = greedy
    args = default_server_args(model_dir) + ["--skip-tokenizer-init", *eagle3_args(head_dir, CHAIN),
                                             "--speculative-use-rejection-sampling"]
    with pytest.raises(RuntimeError, match="needs SGLang's Triton kernels"):
        with SGLangServer(args, startup_timeout=240):
            pass
