"""SGLang 0.5.23 on a machine without a GPU through flexdraft_sgl.sglang.cpu: the pure-torch sgl_kernel ops (and the KV
slots EAGLE draft steps read on torch_native) equal SGLang's Triton kernels, install() reaches spawned children,
registers its hooks and never shadows a real sgl_kernel, plain SGLang greedy equals Hugging Face greedy, and SGLang's
own NGRAM speculative decoding (which needs the torch_native verify hooks) gives exactly the non-speculative output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sglang_harness as harness
from conftest import hf_greedy

from flexdraft_sgl.patches.torch_native_verify import _request_masks
from flexdraft_sgl.sglang import cpu, launch
from flexdraft_sgl.sglang.launch import free_port as launch_free_port
from flexdraft_sgl.sglang.cpu.sgl_kernel_shim import sgl_kernel as shim

EOS = 2
needs_cpu_sglang = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU support is off on a GPU machine")

CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]
REPETITIVE = [  # prompts whose answers repeat themselves, so NGRAM drafts get accepted
    "Count from 1 to 20.", "Repeat the word 'hello' ten times.", "Write the English alphabet in capital letters.",
    "List the days of the week.", "Write a Python function that adds two numbers.", "List the months of the year.",
    "Write the numbers from 10 down to 1.", "Name the planets of the solar system in order.",
    "Spell the word 'banana' letter by letter.", "Say 'yes' five times.",
]

# ---------------------------------------------------------------------------------------------------------------------
# The shim's ops


@pytest.fixture(scope="module")
def triton_comparison():
    """tests/sglang_ops_reference.py: every shim op against SGLang's Triton kernel (Triton's CPU interpreter)."""
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("sglang_ops_reference.py"))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


# Compared otherwise: the KV row copy with SGLang's native move (below), the tree sampling (CUDA only) with the target
# distribution (test_sglang_eagle_cpu.py).
NO_TRITON_KERNEL = {"copy_all_layer_kv_cache_cpu", "tree_speculative_sampling_target_only"}


@pytest.mark.parametrize("op", sorted(set(shim.__all__) - NO_TRITON_KERNEL))
def test_shim_op_equals_sglang_triton_kernel(triton_comparison, op):
    name = op.removesuffix("_cpu")
    assert name in triton_comparison, f"{op} is not compared"
    assert triton_comparison[name] is None, triton_comparison[name]


def test_shim_kv_copy_equals_sglang_native_move(triton_comparison):
    assert triton_comparison["copy_all_layer_kv_cache"] is None, triton_comparison["copy_all_layer_kv_cache"]


def test_eagle_draft_steps_read_the_kv_of_sglang_triton_kernel(triton_comparison):
    """patches/eagle_torch_native_draft.py: every draft step reads the slots SGLang's multi-step backends read."""
    assert triton_comparison["draft_kv_indices"] is None, triton_comparison["draft_kv_indices"]


def test_shim_bookkeeping_by_hand():
    req_to_token = torch.zeros(3, 8, dtype=torch.int32)
    shim.assign_req_to_token_pool_cpu(torch.tensor([2, 0]), req_to_token, torch.tensor([1, 4]), torch.tensor([3, 7]),
                                      torch.tensor([10, 11, 20, 21, 22]), 8)
    assert req_to_token[2].tolist() == [0, 10, 11, 0, 0, 0, 0, 0]
    assert req_to_token[0].tolist() == [0, 0, 0, 0, 20, 21, 22, 0]
    out = torch.full((6,), -1)
    shim.assign_extend_cache_locs_cpu(torch.tensor([0, 2]), req_to_token, torch.tensor([5, 0]), torch.tensor([7, 2]),
                                      out, 8)
    assert out.tolist() == [21, 22, 0, 10, -1, -1]

    out = torch.full((6,), -1)
    shim.fill_accept_out_cache_loc_cpu(torch.tensor([[0, 2, -1], [3, -1, -1]]), torch.arange(100, 106), out)
    assert out.tolist() == [100, 102, 103, -1, -1, -1]
    bonus = torch.zeros(2, dtype=torch.int32)
    shim.fill_bonus_tokens_cpu(torch.tensor([[5, 6, 7], [8, 9, 0]], dtype=torch.int32),
                               torch.tensor([3, 1], dtype=torch.int32), bonus, 3)
    assert bonus.tolist() == [7, 8]

    k, v = torch.arange(12.0).view(6, 2), torch.arange(6).view(6, 1).half()
    ptrs = torch.tensor([k.data_ptr(), v.data_ptr()], dtype=torch.uint64)
    shim.copy_all_layer_kv_cache_cpu(ptrs, torch.tensor([8, 2]), torch.tensor([0, 5]), torch.tensor([5, 0]))
    assert k[:, 0].tolist() == [10, 2, 4, 6, 8, 0] and v[:, 0].tolist() == [5, 1, 2, 3, 4, 0]


def test_shim_tree_ops_by_hand():
    # Root 0 with children 1 and 2; node 3 under node 1.
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool).flatten()
    positions, index, first_child, sibling = torch.zeros(4, dtype=torch.long), *torch.zeros(3, 1, 4, dtype=torch.long)
    shim.reconstruct_indices_from_tree_mask(mask, torch.tensor([7]), positions, index, first_child, sibling, 1, 4)
    assert positions.tolist() == [7, 8, 8, 9] and index.tolist() == [[0, 1, 2, 3]]
    assert first_child.tolist() == [[1, 3, -1, -1]] and sibling.tolist() == [[-1, 2, -1, -1]]

    # Drafts 5 (node 1), 7 (node 2), 9 (node 3). The target says 7 after the root, then 4: node 2 is accepted.
    predicts, accept_index = torch.zeros(4, dtype=torch.int32), torch.full((1, 3), -1, dtype=torch.int32)
    accepted = torch.zeros(1, dtype=torch.int32)
    shim.verify_tree_greedy_cpu(predicts, accept_index, accepted, torch.tensor([[1, 5, 7, 9]]), index, first_child,
                                sibling, torch.tensor([[7, 0, 4, 0]]))
    assert accept_index.tolist() == [[0, 2, -1]] and accepted.tolist() == [1] and predicts.tolist() == [7, 0, 4, 0]

    ids = torch.tensor([1, 2, 3, 4, 5])
    shim.rotate_input_ids_cpu(ids, torch.tensor([0, 3]), torch.tensor([3, 2]), torch.tensor([8, 9]))
    assert ids.tolist() == [2, 3, 8, 5, 9]


def test_verify_masks_accept_both_layouts():
    w, seq_lens = 3, [2, 4]
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)  # node 2 does not see node 1
    qlen = torch.cat([tree.flatten(), tree.flatten()])
    full = torch.cat([torch.cat([torch.ones(w, n, dtype=torch.bool), tree], 1).flatten() for n in seq_lens])
    expected = [torch.cat([torch.ones(w, n, dtype=torch.bool), tree], 1) for n in seq_lens]
    for layout in (qlen, full, torch.cat([full, torch.ones(5, dtype=torch.bool)])):  # FULL_MASK may be padded
        assert all(torch.equal(a, b) for a, b in zip(_request_masks(layout, seq_lens, w), expected))
    causal = _request_masks(None, [2], w)[0]
    assert causal.tolist() == [[True] * 3 + [False] * 2, [True] * 4 + [False], [True] * 5]
    assert _request_masks(None, [2, 5], 1) == [None, None]  # one row per request attends to all: no mask
    with pytest.raises(ValueError):
        _request_masks(torch.ones(7, dtype=torch.bool), seq_lens, w)


# ---------------------------------------------------------------------------------------------------------------------
# install()


def test_install_is_a_no_op_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    path, env = list(sys.path), dict(os.environ)
    assert cpu.install() is False
    assert sys.path == path and dict(os.environ) == env


def test_install_is_a_no_op_with_a_real_sgl_kernel(monkeypatch, tmp_path):
    (tmp_path / "sgl_kernel").mkdir()
    (tmp_path / "sgl_kernel" / "__init__.py").write_text("REAL = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "sgl_kernel", raising=False)  # in case this process imported the shim
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path, env = list(sys.path), dict(os.environ)
    try:
        assert cpu.install() is False
        assert sys.path == path and dict(os.environ) == env
    finally:
        sys.modules.pop("sgl_kernel", None)


INSTALL_CHECK = """
import json, multiprocessing, os, subprocess, sys
sys.path.insert(0, {broken!r})  # an sgl_kernel that fails to import, like the CUDA wheel without libcuda
from flexdraft_sgl.sglang import cpu
from sglang.srt.plugins.hook_registry import HookRegistry
first, second = cpu.install(), cpu.install()
from sglang.srt.speculative import eagle_utils
import sgl_kernel
ctx = multiprocessing.get_context("spawn")  # as SGLang starts its scheduler and detokenizer
with ctx.Pool(1) as pool:
    spawned = pool.apply(eval, ("__import__('sgl_kernel').__file__",))
plain = subprocess.run([sys.executable, "-c", "import sgl_kernel; print(sgl_kernel.__file__)"],
                       capture_output=True, text=True).stdout.strip()
print(json.dumps(dict(installed=[first, second], here=sgl_kernel.__file__, spawned=spawned, plain=plain,
                      path_count=sys.path.count(str(cpu.SHIM_DIR)),
                      pythonpath=os.environ["PYTHONPATH"].split(os.pathsep).count(str(cpu.SHIM_DIR)),
                      cpu_engine=os.environ.get("SGLANG_USE_CPU_ENGINE"),
                      hooks=sorted(".".join(t.split(".")[-2:]) for t in HookRegistry._hooks),
                      tree_sampling=eagle_utils.tree_speculative_sampling_target_only.__module__)))
"""


@needs_cpu_sglang
def test_install_reaches_spawned_children_and_replaces_a_broken_sgl_kernel(tmp_path):
    (tmp_path / "sgl_kernel").mkdir()
    (tmp_path / "sgl_kernel" / "__init__.py").write_text("raise ImportError('libcuda.so.1: cannot open')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("SGLANG_USE_CPU_ENGINE", "PYTHONPATH")}
    proc = subprocess.run([sys.executable, "-c", INSTALL_CHECK.format(broken=str(tmp_path))], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads(proc.stdout.splitlines()[-1])
    shim_file = str(cpu.SHIM_DIR / "sgl_kernel" / "__init__.py")
    assert got["installed"] == [True, True]
    assert got["here"] == got["spawned"] == got["plain"] == shim_file
    assert got["path_count"] == got["pythonpath"] == 1
    assert got["cpu_engine"] == "1"
    assert got["hooks"] == ["DraftBackendFactory._create_backend", "LogitsProcessor._compute_lm_head",
                            "TorchNativeAttnBackend.forward_extend", "TorchNativeAttnBackend.init_forward_metadata",
                            "UnquantizedLinearMethod.apply", "eagle_utils._verify_uses_greedy"]
    assert got["tree_sampling"] == "sgl_kernel.speculative"  # the shim's, bound into SGLang's verify


# ---------------------------------------------------------------------------------------------------------------------
# Real SGLang on CPU


@pytest.fixture(scope="module")
def prompts(smollm2):
    _, tokenizer = smollm2
    return {"chat": harness.chat_prompts(tokenizer, CHAT), "repetitive": harness.chat_prompts(tokenizer, REPETITIVE)}


@pytest.fixture(scope="module")
def plain_sglang(prompts):
    """Non-speculative SGLang: the chat prompts one at a time (32 tokens), the repetitive ones batched (20 tokens)."""
    body = "\n".join([
        "chat, inputs = inputs['chat'], inputs['repetitive']",
        harness.greedy_body(20, batched=True),
        "repetitive, inputs = result, chat",
        harness.greedy_body(32, batched=False),
        "result = {'chat': result, 'repetitive': repetitive}",
    ])
    return harness.run_with_engine(body, inputs=prompts)


@pytest.mark.slow
@needs_cpu_sglang
def test_plain_sglang_greedy_equals_hugging_face(smollm2, prompts, plain_sglang):
    model, _ = smollm2
    assert plain_sglang["chat"] == [hf_greedy(model, p, 32, eos=EOS) for p in prompts["chat"]]


@pytest.mark.slow
@needs_cpu_sglang
def test_sglang_server_greedy_equals_hugging_face(smollm2, prompts, monkeypatch):
    """Also: a server whose port another process took while it started (its uvicorn then hangs instead of exiting)
    is restarted on a fresh port."""
    model, tokenizer = smollm2
    prompt = prompts["chat"][0]
    expected = hf_greedy(model, prompt, 32, eos=EOS)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    monkeypatch.setattr(launch, "free_port", lambda: next(ports, None) or launch_free_port())
    with taken, harness.cpu_server() as server:
        assert server.port != taken.getsockname()[1]
        native = server.post("/generate", {"input_ids": prompt,
                                           "sampling_params": {"temperature": 0, "max_new_tokens": 32}})
        chat = server.post("/v1/chat/completions", {"model": "default", "temperature": 0, "max_tokens": 32,
                                                    "messages": [{"role": "user", "content": CHAT[0]}]})
    assert native["output_ids"] == expected
    assert chat["choices"][0]["message"]["content"] == tokenizer.decode(expected, skip_special_tokens=True)


NGRAM_BODY = f"""
{harness.greedy_body(20, batched=False)}
one_at_a_time = result
outputs = engine.generate(input_ids=inputs, sampling_params={{'temperature': 0.0, 'max_new_tokens': 20}})
result = dict(one_at_a_time=one_at_a_time, batched=[o['output_ids'] for o in outputs],
              verify_steps=sum(o['meta_info'].get('spec_verify_ct', 0) for o in outputs),
              accepted_drafts=sum(o['meta_info'].get('spec_num_correct_drafts', 0) for o in outputs))
"""


@pytest.mark.slow
@needs_cpu_sglang
@pytest.mark.parametrize("width", [4, 8])
def test_ngram_on_cpu_equals_non_speculative(prompts, plain_sglang, width):
    got = harness.run_with_engine(NGRAM_BODY, inputs=prompts["repetitive"], engine_args=dict(
        speculative_algorithm="NGRAM", speculative_num_draft_tokens=width))
    assert got["verify_steps"] > 0 and got["accepted_drafts"] > 0  # the verify path ran and accepted drafts
    assert got["one_at_a_time"] == plain_sglang["repetitive"]
    assert got["batched"] == plain_sglang["repetitive"]


@pytest.mark.slow
@needs_cpu_sglang
def test_flexdraft_through_the_engine_api_equals_non_speculative(prompts, plain_sglang, smollm2_adapter):
    """`sglang.Engine(speculative_algorithm="FLEXDRAFT")`: the Python runtime API, not only the server."""
    got = harness.run_with_engine(NGRAM_BODY, inputs=prompts["repetitive"], engine_args=dict(
        speculative_algorithm="FLEXDRAFT", speculative_draft_model_path=smollm2_adapter))
    assert got["verify_steps"] > 0
    assert got["one_at_a_time"] == plain_sglang["repetitive"]
    assert got["batched"] == plain_sglang["repetitive"]
