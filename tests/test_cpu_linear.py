"""patches/cpu_linear: every CPU matmul routine computes what F.linear computes, a packed weight follows writes to the
weight, the hooks take only the cases they cover and hand everything else to SGLang, and the routine is chosen as
configured."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from flexdraft_sgl.patches import cpu_linear

ORIGINAL = object()  # what the stand-in for SGLang's own implementation returns


def original(*args, **kwargs):
    return ORIGINAL


@pytest.fixture
def routing(monkeypatch):
    """Set FLEXDRAFT_CPU_LINEAR for one test, forgetting any choice made before."""
    def set_mode(mode):
        monkeypatch.setenv(cpu_linear.ENV, mode)
        monkeypatch.setattr(cpu_linear, "_choice", None)
    return set_mode


@pytest.mark.parametrize("mode", ["by_rows", "packed", "off"])
@pytest.mark.parametrize("shape", [(1, 96), (2, 96), (5, 96), (3, 4, 96), (1, 1, 96), (40, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_every_routine_equals_f_linear(routing, mode, shape, bias):
    routing(mode)
    torch.manual_seed(0)
    x, weight = torch.randn(shape), torch.randn(40, 96)
    b = torch.randn(40) if bias else None
    got = cpu_linear.cpu_linear(x, weight, b, owner=torch.nn.Module())
    assert got.shape == (*shape[:-1], 40)
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-4)


def test_a_packed_weight_is_remade_when_the_weight_is_written(routing):
    routing("packed")
    layer = torch.nn.Linear(96, 40, bias=False).requires_grad_(False)
    x = torch.randn(3, 96)
    cpu_linear.cpu_linear(x, layer.weight, owner=layer)
    first = layer._flexdraft_packed[2]
    with torch.no_grad():
        layer.weight.mul_(2)  # e.g. SGLang's update_weights writing in place
    torch.testing.assert_close(cpu_linear.cpu_linear(x, layer.weight, owner=layer), F.linear(x, layer.weight),
                               rtol=1e-5, atol=1e-4)
    second = layer._flexdraft_packed[2]
    assert second is not first
    cpu_linear.cpu_linear(x, layer.weight, owner=layer)
    assert layer._flexdraft_packed[2] is second  # unchanged weight: the same copy


def test_the_linear_hook_takes_only_float32_cpu_matmuls(routing, monkeypatch):
    routing("by_rows")
    calls = []
    monkeypatch.setattr(cpu_linear, "by_weight_rows", lambda x, w, b: calls.append(x.shape) or F.linear(x, w, b))
    layer = SimpleNamespace(weight=torch.nn.Parameter(torch.randn(40, 96), requires_grad=False))
    x = torch.randn(3, 96)
    torch.testing.assert_close(cpu_linear._around_linear_apply(original, None, layer, x), F.linear(x, layer.weight))
    assert calls == [(3, 96)]
    assert cpu_linear._around_linear_apply(original, None, layer, x.bfloat16()) is ORIGINAL
    assert cpu_linear._around_linear_apply(original, None, layer, x.requires_grad_()) is ORIGINAL
    amx = SimpleNamespace(weight=layer.weight, use_intel_amx_backend=True)
    assert cpu_linear._around_linear_apply(original, None, amx, x) is ORIGINAL
    assert cpu_linear._around_linear_apply(original, None, SimpleNamespace(weight=None), x) is ORIGINAL
    assert calls == [(3, 96)]


def test_the_lm_head_hook_takes_only_a_plain_unquantized_head(routing):
    routing("packed")
    processor = SimpleNamespace(use_fp32_lm_head=False, rl_on_policy_target=None)
    head = torch.nn.Module()
    head.weight = torch.nn.Parameter(torch.randn(300, 96), requires_grad=False)
    hidden = torch.randn(2, 96)
    got = cpu_linear._around_compute_lm_head(original, processor, hidden, head, None, out=None)
    torch.testing.assert_close(got, hidden @ head.weight.T, rtol=1e-5, atol=1e-4)
    lora = torch.nn.Module()
    lora.weight, lora.set_lora = head.weight, None
    assert cpu_linear._around_compute_lm_head(original, processor, hidden, lora) is ORIGINAL
    fp32_head = SimpleNamespace(use_fp32_lm_head=True, rl_on_policy_target=None)
    assert cpu_linear._around_compute_lm_head(original, fp32_head, hidden, head) is ORIGINAL


def test_off_keeps_f_linear_and_a_bad_value_is_refused(routing, monkeypatch):
    monkeypatch.setattr(cpu_linear, "_run", lambda *a: pytest.fail("rerouted although off"))
    routing("off")
    x, weight = torch.randn(2, 96), torch.randn(40, 96)
    torch.testing.assert_close(cpu_linear.cpu_linear(x, weight), F.linear(x, weight))
    routing("fast")
    with pytest.raises(ValueError, match="FLEXDRAFT_CPU_LINEAR='fast'"):
        cpu_linear.cpu_linear(x, weight)


def test_auto_measures_once_per_machine_and_buckets_row_counts(routing, monkeypatch, tmp_path):
    routing("auto")
    monkeypatch.setenv("FLEXDRAFT_CACHE", str(tmp_path))
    widths = []
    monkeypatch.setattr(cpu_linear, "measure_choice", lambda width: widths.append(width) or {
        m: "by_rows" if m <= 4 else "packed" for m in cpu_linear.BUCKETS})
    assert [cpu_linear.routine_for(m, 96) for m in (1, 4, 5, 300)] == ["by_rows", "by_rows", "packed", "packed"]
    weight = torch.randn(40, 96)
    for m in (1, 2, 7):
        x = torch.randn(m, 96)
        torch.testing.assert_close(cpu_linear.cpu_linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-4)
    assert widths == [96]
    routing("auto")  # another process on this machine reads the choice instead of measuring
    assert cpu_linear.routine_for(300, 96) == "packed" and widths == [96]
    (file,) = (tmp_path / "cpu-linear").iterdir()
    file.write_text("{")  # a damaged file is measured again
    routing("auto")
    assert cpu_linear.routine_for(1, 96) == "by_rows" and widths == [96, 96]


def test_a_read_only_cache_only_costs_a_measurement(routing, monkeypatch, tmp_path):
    routing("auto")
    (tmp_path / "cpu-linear").write_text("a file where the folder should be")
    monkeypatch.setenv("FLEXDRAFT_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_linear, "measure_choice", lambda width: {m: "by_rows" for m in cpu_linear.BUCKETS})
    assert cpu_linear.routine_for(3, 96) == "by_rows"


def test_measure_choice_picks_a_routine_per_bucket():
    choice = cpu_linear.measure_choice(64, buckets=(1, 8), repeats=1)
    assert set(choice) == {1, 8} and set(choice.values()) <= {"blas", "by_rows", "packed"}


def test_the_probe_streams_a_bounded_number_of_weights():
    # A test model's width must not multiply its tiny weights by the thousand (servers of such models once timed out
    # at start-up measuring 5,000 of them); a wide model's still gets one pair.
    assert cpu_linear.probe_pairs(64) == cpu_linear.MAX_PROBE_PAIRS
    assert cpu_linear.probe_pairs(576) == 32  # SmolLM2: 32 pairs of 8 MiB, the 256 MiB budget
    assert cpu_linear.probe_pairs(4096) == 1
