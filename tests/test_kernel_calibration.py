"""The calibration kernels (flexdraft_sgl.kernels.calibration) against their PyTorch reference, on CPU.

The Triton kernels run under the Triton interpreter, in a child process. triton 3.8 reads TRITON_INTERPRET when
`triton.jit` decorates a function (triton.runtime.jit.jit), so the variable must be set before `triton.language` is
first imported: its own helpers (tl.zeros, tl.sigmoid, ...) are jit functions too, and a kernel interpreted over
compiled helpers fails. This process has usually imported triton already (torch, SGLang), and setting the variable
here would change every later import, so the child runs this file as a script with the variable set from the start
and saves the kernels' outputs; the tests compare them with the reference here.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from flexdraft_sgl.adapter.modules import CalibrationMLP  # noqa: E402
from flexdraft_sgl.kernels import calibration as kernels  # noqa: E402

CASES = {  # name: (M or leading dims, H, rank, V, V', dtype); nothing is a multiple of the kernels' block sizes
    "float32": (13, 96, 48, 1000, 1024, torch.float32),
    "float32-loops": (70, 160, 80, 515, 515, torch.float32),  # loops over H, rank and row tiles
    # bfloat16 cannot be checked here: the interpreter multiplies bfloat16 dot operands as raw uint16.
    "float16": (13, 96, 48, 1000, 1024, torch.float16),
    "leading-dims": ((2, 3), 96, 48, 1000, 1024, torch.float32),
    "float32-raw": (13, 96, 48, 1000, 1024, torch.float32),  # calibration_input "raw": no unit-RMS scaling
}


def make_case(name: str, seed: int = 0):
    """A calibration with every weight random (the module zero-initialises `down`), bonus embeddings, hidden states
    and padded target logits like a real step's but small, and temperatures in [0.5, 1.5]. With leading dims
    [bs, B-1], the bonus embedding is expanded over the block and the temperatures are per request, as callers pass
    them."""
    lead, H, rank, V, V_padded, dtype = CASES[name]
    lead = lead if isinstance(lead, tuple) else (lead,)
    g = torch.Generator().manual_seed(seed)
    scaling = "raw" if name.endswith("-raw") else "unit-rms"
    calibration = CalibrationMLP(H, rank, V, input_scaling=scaling).requires_grad_(False)
    for p in calibration.parameters():
        p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)  # a correction of about unit size
    # The halves differ in scale (embeddings are much smaller than hidden states); unit_rms must undo it.
    bonus = torch.randn(*lead, H, generator=g) * 0.05
    hidden = torch.randn(*lead, H, generator=g) * 3.0
    logits = torch.randn(*lead, V_padded, generator=g) * 2.0
    temperatures = torch.rand(lead, generator=g) + 0.5
    if len(lead) == 2:
        bonus = bonus[:, :1].expand_as(hidden)
        temperatures = temperatures[:, :1].expand(lead)
    return calibration.to(dtype), bonus.to(dtype), hidden.to(dtype), logits.to(dtype), temperatures


def run_interpreted(path: str) -> None:
    """In the child: every case through calibrate_triton, with temperatures and without, saved to `path`."""
    assert type(kernels._down_kernel).__name__ == "InterpretedFunction", "TRITON_INTERPRET was not seen"
    results = {}
    for name in CASES:
        calibration, bonus, hidden, logits, temperatures = make_case(name)
        for t_name, t in (("sampled", temperatures), ("greedy", None)):
            out = kernels.calibrate_triton(calibration, bonus, hidden, logits, t)
            results[name, t_name] = dataclasses.asdict(out)
    torch.save(results, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "triton.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, __file__, str(path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return torch.load(path)


def assert_matches(out: dict, ref: kernels.CalibratedDrafts, tol: float) -> None:
    """Logits within `tol` of the reference's largest magnitude; tokens equal wherever the reference's top-2 gap is
    wider than the error could close (nearly every row, asserted, so the check is not vacuous); top and probs within
    the relative error such a logits error makes (a logit off by d scales its probability by about exp(d / t))."""
    logits = out["logits"]
    assert logits.dtype == torch.float32 and logits.shape == ref.logits.shape
    scale = ref.logits.abs().max()
    err = (logits - ref.logits).abs().max()
    assert err / scale < tol, f"relative logits error {float(err / scale):.2e}"
    top2 = ref.logits.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 4 * tol * scale
    assert decided.float().mean() >= 0.9
    assert out["tokens"].dtype == torch.int64 and out["tokens"].shape == ref.tokens.shape
    assert torch.equal(out["tokens"][decided], ref.tokens[decided])
    rtol = 8 * tol * float(scale)  # temperatures >= 0.5
    torch.testing.assert_close(out["top"], ref.top, rtol=rtol, atol=1e-7)
    if ref.probs is None:
        assert out["probs"] is None
    else:
        torch.testing.assert_close(out["probs"], ref.probs, rtol=rtol, atol=1e-7)


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "greedy"])
@pytest.mark.parametrize("name", ["float32", "float32-loops", "leading-dims", "float32-raw"])
def test_triton_matches_reference(interpreted, name, sampled):
    calibration, bonus, hidden, logits, temperatures = make_case(name)
    t = temperatures if sampled else None
    ref = kernels.calibrate_reference(calibration, bonus, hidden, logits, t)
    assert_matches(interpreted[name, "sampled" if sampled else "greedy"], ref, tol=1e-5)


def test_triton_matches_reference_float16(interpreted):
    """16-bit weights and inputs: the kernels accumulate in float32, so they are held to the float32 reference of the
    same 16-bit values; the error left is u's rounding to float16 for the second product."""
    calibration, bonus, hidden, logits, temperatures = make_case("float16")
    ref = kernels.calibrate_reference(calibration.float(), bonus.float(), hidden.float(), logits.float(), temperatures)
    assert_matches(interpreted["float16", "sampled"], ref, tol=5e-4)


def test_calibrate_on_cpu_is_the_reference(monkeypatch):
    def no_triton(*args):
        raise AssertionError("calibrate picked the Triton kernels for CPU tensors")

    monkeypatch.setattr(kernels, "calibrate_triton", no_triton)
    calibration, bonus, hidden, logits, temperatures = make_case("leading-dims")
    for t in (temperatures, None):
        out = kernels.calibrate(calibration, bonus, hidden, logits, t)
        ref = kernels.calibrate_reference(calibration, bonus, hidden, logits, t)
        for field in ("logits", "tokens", "top", "probs"):
            a, b = getattr(out, field), getattr(ref, field)
            assert (a is None and b is None) or torch.equal(a, b), field


def test_hidden_form_is_the_logits_form_factored_through_the_head():
    """A hidden-space correction read through the (linear) LM head equals a logits-form calibration whose down
    weight is head @ W_down: what `calibrated_drafts` computes for it is what the kernels would for that one."""
    g = torch.Generator().manual_seed(1)
    H, rank, V = 32, 16, 200
    head = torch.randn(V + 8, H, generator=g) / H ** 0.5  # a padded vocabulary: the first V columns count
    hidden_form = CalibrationMLP(H, rank, V, form="hidden", input_scaling="raw").requires_grad_(False)
    logits_form = CalibrationMLP(H, rank, V, form="logits", input_scaling="raw").requires_grad_(False)
    for p in hidden_form.parameters():
        p.copy_(torch.randn(p.shape, generator=g))
    logits_form.up.load_state_dict(hidden_form.up.state_dict())
    logits_form.down.weight.copy_(head[:V] @ hidden_form.down.weight)
    logits_form.down.bias.copy_(head[:V] @ hidden_form.down.bias)
    bonus, hidden, t = torch.randn(2, 3, H, generator=g), torch.randn(2, 3, H, generator=g), torch.full((2, 3), 0.7)
    out = kernels.calibrated_drafts(hidden_form, bonus, hidden, lambda x: x @ head.T, t)
    ref = kernels.calibrate_reference(logits_form, bonus, hidden, hidden @ head.T, t)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-4)
    assert torch.equal(out.tokens, ref.tokens)
    torch.testing.assert_close(out.probs, ref.probs, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="logits-form"):
        kernels.calibrate_triton(hidden_form, bonus, hidden, hidden @ head.T, t)


def test_greedy_drafts_over_a_draft_vocabulary_read_only_its_logits():
    """All rows greedy with a draft vocabulary: the argmax and confidence are computed over its V' logits alone and
    equal what the full [.., V] logits (-inf off the vocabulary) give, ties included (lowest token id wins)."""
    from flexdraft_sgl.adapter.modules import DraftHead

    g = torch.Generator().manual_seed(2)
    H, rank, V = 32, 16, 300
    calibration = CalibrationMLP(H, rank, V, form="hidden").requires_grad_(False)
    for p in calibration.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    weight = torch.randn(V, H, generator=g)
    weight[41] = weight[7]  # two draft-vocabulary tokens with equal logits everywhere: a tie on every row
    vocab = torch.tensor([250, 41, 3, 7, 99, 120, 18])  # most frequent first, not sorted
    head = DraftHead(weight, vocab, V)
    bonus, hidden = torch.randn(4, 5, H, generator=g), torch.randn(4, 5, H, generator=g)
    compact = kernels.calibrated_drafts(calibration, bonus, hidden, head, None)
    full = kernels.drafts_from_logits(calibration.logits(bonus, hidden, head).float())
    assert compact.logits is None and compact.probs is None  # nothing reads them when every row is greedy
    assert torch.equal(compact.tokens, full.tokens) and torch.isin(full.tokens, vocab).all()
    torch.testing.assert_close(compact.top, full.top, rtol=1e-6, atol=0)
    assert (compact.tokens == 7).any() and not (compact.tokens == 41).any()  # ties went to the lower id
    sampled = kernels.calibrated_drafts(calibration, bonus, hidden, head, torch.full((4, 5), 0.8))
    assert sampled.logits.shape == sampled.probs.shape == (4, 5, V)  # a sampling row needs the whole distribution
    assert torch.equal(sampled.tokens, full.tokens)


if __name__ == "__main__":
    run_interpreted(sys.argv[1])
