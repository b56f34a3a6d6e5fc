"""The GPU path as a GPU user meets it, checked on CPU (issue 15): the attention backend FLEXDRAFT resolves to when
none is named, the tensor-parallel MLP reduction, logprobs across the graph runners' shared logits buffer, verify
forwards without a mask, sampling memory in mixed batches, and what `flexdraft demo` reports in bf16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import sglang.srt.distributed as distributed
import torch
from conftest import random_adapter, tiny_target
from sglang.srt.layers import logprob_processor

from flexdraft_sgl import cli
from flexdraft_sgl.patches.torch_native_verify import _request_masks
from flexdraft_sgl.core.acceptance import greedy_verify
from flexdraft_sgl.core.layout import verify_layout
from flexdraft_sgl.core.masks import full_mask, full_mask_indptr
from flexdraft_sgl.core.sampling import CalibratedDrafts, SamplingParams, draft_temperatures, filtered_probs
from flexdraft_sgl.sglang import drafter, launch
from flexdraft_sgl.sglang.launch import first_difference
from flexdraft_sgl.sglang.state import FlexDraftState, FlexDraftVerifyInput
from flexdraft_sgl.sglang.worker import FlexDraftWorker, _sampling_params

# SGLang's real argument resolution in a fresh process (load_plugins patches SGLang globally). `hopper` stands in
# for an H100/H200: SGLang's platform default for a topk-1 setup there is fa3 (get_default_attn_backend,
# sglang/srt/arg_groups/model_override_base.py).
RESOLVE = textwrap.dedent("""
    import json, sys
    from sglang.srt.plugins import load_plugins
    load_plugins()
    import sglang.srt.arg_groups.overrides as overrides
    from sglang.srt.server_args import ServerArgs
    model, adapter, cases = json.loads(sys.stdin.read())
    results = []
    for case in cases:
        if case.pop("hopper", False):
            overrides.get_default_attn_backend = lambda *args, **kwargs: "fa3"
        args = ServerArgs(model_path=model, speculative_algorithm="flexdraft", speculative_draft_model_path=adapter,
                          skip_tokenizer_init=True, **case)
        try:
            args.resolve_once()
        except ValueError as e:
            results.append(["refused", str(e)])
            continue
        sources = [source for source, fields in args._resolved_overrides if "attention_backend" in fields]
        results.append([overrides.resolving_view(args).attention_backend, sources])
    print("@@" + json.dumps(results))
""")


def _resolve(tmp_path, cases):
    model = tiny_target()
    model.save_pretrained(tmp_path / "model")
    random_adapter(model, block_size=4).save(tmp_path / "adapter")
    stdin = json.dumps([str(tmp_path / "model"), str(tmp_path / "adapter"), cases])
    proc = subprocess.run([sys.executable, "-c", RESOLVE], input=stdin, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "SGLANG_USE_CPU_ENGINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("@@")[-1])


def test_flexdraft_chooses_a_mask_backend_unless_one_is_named(tmp_path):
    cpu, named_cpu, hopper, named_triton, named_fa3 = _resolve(tmp_path, [
        {"device": "cpu"},
        {"device": "cpu", "attention_backend": "torch_native"},
        {"device": "cuda", "hopper": True},
        {"device": "cuda", "hopper": True, "attention_backend": "triton"},
        {"device": "cuda", "hopper": True, "attention_backend": "fa3"},
    ])
    # on CPU SGLang's own default is intel_amx (handle_cpu_backends), which FLEXDRAFT replaces
    assert cpu == ["torch_native", ["_handle_cpu_backends", "flexdraft_attention_backend_default"]]
    assert named_cpu == ["torch_native", []]
    assert hopper[0] == "flashinfer" and "flexdraft_attention_backend_default" in hopper[1]
    assert named_triton[0] == "triton" and "flexdraft_attention_backend_default" not in named_triton[1]
    assert named_fa3[0] == "refused"
    assert "cannot use --attention-backend fa3" in named_fa3[1] and "flashinfer, triton" in named_fa3[1]


def test_mlp_partial_sums_are_reduced_exactly_once_across_ranks(monkeypatch):
    """A fake 2-rank tensor-parallel group whose ranks hold equal partial sums p: the full MLP output is 2p whether
    the MLP reduces itself (down_proj.reduce_results, an MLP built without stage boundaries) or leaves the sum to the
    decoder layer's boundary (SGLang's Llama / Qwen layers), which mask rows skip."""

    def all_reduce(x):  # the sum over two ranks holding the same partial
        return 2 * x

    class ShardedMLP(torch.nn.Module):
        def __init__(self, reduce_results: bool):
            super().__init__()
            self.down_proj = types.SimpleNamespace(reduce_results=reduce_results)

        def forward(self, h):
            partial = 3 * h
            return all_reduce(partial) if self.down_proj.reduce_results else partial

    monkeypatch.setattr(distributed, "tensor_model_parallel_all_reduce", all_reduce)
    monkeypatch.setattr(drafter, "tp_size", lambda: 2)
    h = torch.randn(4, 8)
    for reduce_results in (True, False):
        assert torch.equal(drafter.mlp_output(ShardedMLP(reduce_results), h), 6 * h), reduce_results
    monkeypatch.setattr(drafter, "tp_size", lambda: 1)  # one rank: nothing to reduce
    assert torch.equal(drafter.mlp_output(ShardedMLP(False), h), 3 * h)


def _worker(mode: str, verify_len: int, block_size: int = 4):
    """A FlexDraftWorker with only what `_decode` reads (no model: the forwards are faked by the tests)."""

    worker = object.__new__(FlexDraftWorker)
    worker.settings = types.SimpleNamespace(mode=mode, verify_len=verify_len, max_verify_len=block_size - 1)
    worker.verify_caps, worker.block_size, worker.graphs = (verify_len,), block_size, None
    worker.generator = torch.Generator().manual_seed(0)
    return worker


def test_sequential_logprobs_survive_the_shared_graph_logits_buffer(monkeypatch):
    """Under CUDA graphs every width's runner returns its logits as a view of the one shared buffer
    (GraphSharedOutput.get_logits_buffer), so the bonus forward of a sequential step overwrites the verify logits.
    The logprobs of the emitted tokens must still come from the logits each token was decided by."""

    bs, vocab, v = 3, 11, 2
    shared = torch.zeros(64, vocab)  # the graph runners' one logits buffer
    produced = []  # what each forward really computed, [bs, W, V]
    g = torch.Generator().manual_seed(1)

    def forward_rows(batch, prefix_lens, tokens):
        rows = tokens.numel()
        shared[:rows] = torch.randn(rows, vocab, generator=g)
        produced.append(shared[:rows].clone().view(*tokens.shape, vocab))
        output = types.SimpleNamespace(next_token_logits=shared[:rows])
        return shared[:rows].view(*tokens.shape, vocab), types.SimpleNamespace(logits_output=output,
                                                                               can_run_cuda_graph=True)

    seen = {}

    def compute_spec_logprobs(batch, logits_output, predict, accept_index):
        seen.update(table=logits_output.next_token_logits.clone(), index=accept_index.clone())

    worker = _worker("sequential", v)
    monkeypatch.setattr(worker, "_forward_rows", forward_rows)
    monkeypatch.setattr(worker, "_draft", lambda *args: None)
    monkeypatch.setattr(logprob_processor, "compute_spec_logprobs", compute_spec_logprobs)
    state = FlexDraftState(torch.tensor([1, 2, 3]), torch.randint(0, vocab, (bs, 3), generator=g), torch.ones(bs, 3))
    sampling = types.SimpleNamespace(temperatures=torch.ones(bs, 1), top_ks=torch.ones(bs, dtype=torch.int32),
                                     top_ps=torch.ones(bs), is_all_greedy=True)
    batch = types.SimpleNamespace(spec_info=state, sampling_info=sampling, seq_lens=torch.tensor([5, 7, 9]),
                                  req_pool_indices=torch.arange(bs), return_logprob=True)
    result = worker._decode(batch)

    verify, bonus = produced
    emitted = result.accept_lens.long()
    table = seen["table"].view(bs, -1, vocab)
    for i in range(bs):
        rows = seen["index"][i, : emitted[i]] - i * table.shape[1]
        expected = torch.cat([verify[i, : emitted[i] - 1], bonus[i]])  # drafts + bonus, then the exact token
        assert torch.equal(table[i, rows], expected), i


def test_verify_forwards_carry_no_mask_the_backends_causal_chain_is_the_rule():
    """A FLEXDRAFT verify forward sends no custom mask (nothing built per step, on host or device): its rows are a
    causal chain after each request's prefix, which flashinfer (paged prefill with causal=True), triton (its causal
    extend kernel) and torch_native (patches/torch_native_verify) apply on their own. That chain is exactly
    core.masks' visibility rule for a verify layout, at every width and prefix."""

    g = torch.Generator().manual_seed(0)
    for width in range(1, 9):
        prefix = torch.randint(0, 40, (5,), generator=g)
        layout = verify_layout(prefix, [width - 1] * len(prefix), block_size=8)
        flat, indptr = full_mask(layout), full_mask_indptr(layout)
        chains = _request_masks(None, prefix.tolist(), width)
        for i, chain in enumerate(chains):
            if width == 1:  # one row sees everything: no mask at all
                assert chain is None
                chain = torch.ones(1, int(prefix[i]) + 1, dtype=torch.bool)
            assert torch.equal(chain.flatten(), flat[indptr[i] : indptr[i + 1]]), (width, i)


def test_verify_input_gives_flashinfer_the_chain_arguments_without_a_mask():
    """The CSR arguments flashinfer plans a verify with (generate_attn_arg_prefill): each request's rows read its
    prefix plus the W new slots, W query rows per request, and no mask."""

    req_to_token = torch.arange(4 * 32, dtype=torch.int32).view(4, 32)

    def pack_read_stream(plan, *, req_pool_indices, seq_lens, indptr, out, kv_start_idx=None, kind=None):
        for i, (r, n) in enumerate(zip(req_pool_indices.tolist(), seq_lens.tolist())):
            out[int(indptr[i]) : int(indptr[i]) + n] = req_to_token[r, :n]

    width, pools, prefix = 3, torch.tensor([2, 0]), torch.tensor([5, 9])
    spec = FlexDraftVerifyInput(torch.zeros(6, dtype=torch.long), torch.zeros(6, dtype=torch.long), width)
    assert spec.custom_mask is None and spec.num_tokens_per_req == width and spec.is_verify_input()
    kv_indices, kv_indptr, qo_indptr, mask = spec.generate_attn_arg_prefill(
        req_pool_indices=pools, paged_kernel_lens=prefix, paged_kernel_lens_sum=int(prefix.sum()),
        translator=types.SimpleNamespace(pack_read_stream=pack_read_stream), plan=None)
    assert mask is None
    assert qo_indptr.tolist() == [0, 3, 6] and kv_indptr.tolist() == [0, 8, 20]
    assert torch.equal(kv_indices[:20], torch.cat([req_to_token[2, :8], req_to_token[0, :12]]))


def _reference_filter(logits, temperature, top_k, top_p):
    """One request's filtered distribution, written out plainly (full sorts, no batching)."""

    vocab = logits.shape[-1]
    if temperature <= 0 or top_k == 1:
        return torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
    x = logits.float() / temperature
    if 0 < top_k < vocab:
        x = x.masked_fill(x < x.sort(-1, descending=True)[0][..., top_k - 1 : top_k], float("-inf"))
    if top_p < 1:
        s = x.sort(-1, descending=True)[0]
        p = s.softmax(-1)
        keep = ((p.cumsum(-1) - p) < top_p).sum(-1, keepdim=True).clamp(min=1)
        x = x.masked_fill(x < s.gather(-1, keep - 1), float("-inf"))
    return x.softmax(-1)


def test_filters_touch_only_the_requests_that_use_them(monkeypatch):
    """A batch mixing SGLang's greedy (temperature 1, top_k 1), temperature-only, top-k and top-p requests: every row
    equals its own filtered distribution, top-k selects instead of sorting, and only the top-p rows are sorted."""

    settings = [(1.0, 1, 1.0), (0.7, 1 << 30, 1.0), (1.0, 5, 1.0), (0.0, 0, 1.0), (0.9, 1 << 30, 0.8),
                (1.3, 7, 0.6), (1.0, 1, 0.5)]
    temperature, top_k, top_p = (torch.tensor(c) for c in zip(*settings))
    params = SamplingParams(temperature.float(), top_k.long(), top_p.float())
    logits = torch.randn(len(settings), 4, 50, generator=torch.Generator().manual_seed(0)) * 3
    sorted_rows = []
    original_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda self, *a, **k: sorted_rows.append(len(self))
                        or original_sort(self, *a, **k))
    probs = filtered_probs(logits, params)
    monkeypatch.undo()
    assert sorted_rows == [2]  # the two sampling requests with top_p < 1 (rows 4 and 5), nothing else
    for i, (t, k, p) in enumerate(settings):
        torch.testing.assert_close(probs[i], _reference_filter(logits[i], t, k, p), msg=str(settings[i]))


def _calibrated(bs, drafts, vocab, temperatures, seed=0):
    logits = torch.randn(bs, drafts, vocab, generator=torch.Generator().manual_seed(seed)) * 2
    return CalibratedDrafts(logits, logits.argmax(-1), logits.softmax(-1).amax(-1),
                            None if temperatures is None else (logits / temperatures[:, :, None]).softmax(-1))


def test_only_sampling_requests_keep_draft_distributions_and_accept_by_sampling():
    """Drafting a mixed batch keeps [B-1, V] distributions for the sampling requests only; acceptance is greedy for
    the greedy requests and speculative for the others, each against its own kept distribution (a target equal to
    the draft accepts every draft)."""

    bs, vocab, width = 4, 30, 3
    greedy = torch.tensor([True, False, True, False])
    sampling = types.SimpleNamespace(temperatures=torch.ones(bs, 1), top_ks=torch.where(greedy, 1, 1 << 30),
                                     top_ps=torch.ones(bs), is_all_greedy=False)
    worker = _worker("parallel", width)

    params = _sampling_params(sampling)
    calibrated = _calibrated(bs, width, vocab, draft_temperatures(params, False))
    worker.drafter = types.SimpleNamespace(calibrated_drafts=lambda *args: calibrated)
    state = worker._draft(None, None, torch.zeros(bs, dtype=torch.long), sampling)
    assert state.sampled.tolist() == [False, True, False, True] and state.draft_probs.shape == (2, width, vocab)
    assert torch.equal(state.drafts[greedy], calibrated.tokens[greedy])

    target = torch.randn(bs, width + 1, vocab, generator=torch.Generator().manual_seed(3)) * 2
    target[~greedy, :width] = calibrated.logits[~greedy]  # p = q where the sampling requests' drafts are judged
    accepted, bonus = worker._accept(state.drafts, state, target, params)
    expected, expected_bonus = greedy_verify(state.drafts, target.argmax(-1), torch.full((bs,), width))
    assert torch.equal(accepted[greedy], expected[greedy]) and torch.equal(bonus[greedy], expected_bonus[greedy])
    assert accepted[~greedy].tolist() == [width, width]


def test_kept_draft_distributions_follow_their_requests_through_filter_and_merge():
    def state(ids, sampled):
        ids, sampled = torch.tensor(ids), torch.tensor(sampled) if sampled is not None else None
        probs = None if sampled is None else ids[sampled].float()[:, None, None].expand(-1, 2, 3).clone()
        return FlexDraftState(ids, ids[:, None].expand(-1, 2).clone(), torch.ones(len(ids), 2), sampled, probs)

    def check(s):  # every kept distribution is its request's (filled with the request id)
        if s.sampled is not None:
            assert torch.equal(s.draft_probs[:, 0, 0], s.bonus[s.sampled].float())

    a = state([10, 11, 12, 13], [True, False, True, True])
    a.filter_batch(torch.tensor([3, 1, 0]))
    check(a)
    assert a.bonus.tolist() == [13, 11, 10] and a.sampled.tolist() == [True, False, True]
    a.merge_batch(state([20, 21], None))  # an all-greedy batch joins
    a.merge_batch(state([30, 31], [False, True]))
    check(a)
    assert a.sampled.tolist() == [True, False, True, False, False, False, True] and len(a.draft_probs) == 3
    greedy_only = state([1, 2], None)
    greedy_only.merge_batch(state([3], None))
    assert greedy_only.sampled is None and greedy_only.draft_probs is None


class _FakeServer:
    """What `flexdraft demo` reads from a server: one chat reply per configuration, with its token ids."""

    outputs: dict = {}

    started: list = []

    def __init__(self, args, **kwargs):
        self.ids = self.outputs["FLEXDRAFT" if "FLEXDRAFT" in args else "plain"]
        self.started.append(args)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def post(self, path, payload):
        return {"choices": [{"message": {"content": "an answer"}, "response_token_ids": self.ids}],
                "usage": {"completion_tokens": len(self.ids)}}

    def get(self, path):
        return {"internal_states": [{"avg_spec_accept_length": 2.0}]}


@pytest.mark.parametrize("gpu", [False, True])
def test_demo_reports_where_outputs_diverge_and_fails_only_in_float32(monkeypatch, capsys, gpu):
    """On CPU (float32) any difference from plain decoding fails the demo; on a GPU (bf16, where a near-tie can flip
    in a verify forward) it is reported with the agreeing prefix and the first differing token."""

    monkeypatch.setattr(launch, "SGLangServer", _FakeServer)
    monkeypatch.setattr(launch, "has_gpu", lambda: gpu)
    monkeypatch.setattr(cli, "_demo_adapter", lambda model, args: "adapter")
    args = cli.build_parser().parse_args(["demo", "--model", "a-model"])

    monkeypatch.setattr(_FakeServer, "outputs", {"plain": [5, 6, 7, 8], "FLEXDRAFT": [5, 6, 9, 8]})
    assert cli.cmd_demo(args) == (0 if gpu else 1)
    assert "the first 2 of 4 tokens agree, then token 9 where plain decoding has 7" in capsys.readouterr().out
    monkeypatch.setattr(_FakeServer, "outputs", {"plain": [5, 6, 7, 8], "FLEXDRAFT": [5, 6, 7, 8]})
    assert cli.cmd_demo(args) == 0
    assert "output identical to plain decoding" in capsys.readouterr().out
    # The two servers run at once: on a GPU they split its memory instead of each claiming SGLang's default share.
    fractions = [a[a.index("--mem-fraction-static") + 1] for a in _FakeServer.started[-2:]
                 if "--mem-fraction-static" in a]
    assert all("--sleep-on-idle" in a for a in _FakeServer.started[-2:])
    if gpu:
        assert fractions == [str(cli.DEMO_GPU_MEM_FRACTION)] * 2
    else:  # on CPU the shared arguments' own small fraction stands, once
        shared = launch.default_server_args("a-model")
        assert fractions == [shared[shared.index("--mem-fraction-static") + 1]] * 2


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 4, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2 and first_difference([], [7]) == 0


def test_launch_names_flexdrafts_backend_on_a_gpu(monkeypatch):
    """Plain and FLEXDRAFT servers of `demo` / `eval` get the same mask-capable backend (flashinfer on a GPU)."""

    monkeypatch.setattr(launch, "has_gpu", lambda: True)
    args = launch.default_server_args("m")
    assert args[args.index("--attention-backend") + 1] == "flashinfer" and "--device" not in args
    monkeypatch.setattr(launch, "has_gpu", lambda: False)
    args = launch.default_server_args("m")
    assert args[args.index("--attention-backend") + 1] == "torch_native" and "float32" in args


def test_mask_block_shares_sglangs_flashinfer_workspace(monkeypatch):
    """The mask block's FlashInfer wrappers use the workspace SGLang's flashinfer backend registered (no second
    buffer), or one of SGLang's size (SGLANG_FLASHINFER_WORKSPACE_SIZE) when the target runs another backend."""
    from sglang.srt import runtime_context

    registry = {}
    monkeypatch.setattr(runtime_context, "get_buffer", lambda name, make: registry.setdefault(name, make()))
    monkeypatch.setenv("SGLANG_FLASHINFER_WORKSPACE_SIZE", str(1 << 16))
    created = drafter._sglang_workspace("cpu")
    assert registry == {"flashinfer_workspace": created} and created.numel() == 1 << 16
    assert drafter._sglang_workspace("cpu") is created  # SGLang's backend (or an earlier call) made it: shared


def test_gpu_check_says_what_it_does_not_cover():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check_not_covered", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    summary = module.summary_markdown({"meta": {}, "checks": {}})
    assert "Not covered: the SGLang path" in summary and "First run on a GPU" in summary


def test_greedy_requests_stay_exact_beside_sampling_ones_in_sglang(tmp_path):
    """A FLEXDRAFT server (sequential mode) with greedy and top-p sampling requests in the same batches: the greedy
    ones, accepted by argmax while their neighbours keep draft distributions and accept by sampling, still equal
    plain SGLang token for token."""
    from concurrent.futures import ThreadPoolExecutor

    from conftest import random_prompts
    from test_sglang_flexdraft import MAX_NEW, plain_outputs, tiny_setup

    _, model_dir, adapter_dir = tiny_setup(str(tmp_path))
    prompts = random_prompts(24, 16, seed=4, max_len=12)
    expected = plain_outputs(model_dir, tuple(map(tuple, prompts)))
    greedy = {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
    sampled = {"max_new_tokens": MAX_NEW, "temperature": 1.0, "top_p": 0.9, "ignore_eos": True}
    requests = [{"input_ids": p, "sampling_params": params} for p in prompts for params in (greedy, sampled)]
    args = launch.default_server_args(model_dir) + ["--skip-tokenizer-init"] + launch.flexdraft_args(adapter_dir)
    with launch.SGLangServer(args, env={"FLEXDRAFT_MODE": "sequential", "FLEXDRAFT_VERIFY_LEN": "5"}) as server:
        with ThreadPoolExecutor(16) as pool:
            outputs = list(pool.map(lambda r: server.post("/generate", r), requests))
    assert [o["output_ids"] for o in outputs[::2]] == expected
    assert all(len(o["output_ids"]) == MAX_NEW for o in outputs[1::2])
    assert sum(o["meta_info"]["spec_num_correct_drafts"] for o in outputs[1::2]) > 0  # sampled drafts accepted
