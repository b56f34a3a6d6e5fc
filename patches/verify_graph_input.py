"""Give SGLang's TARGET_VERIFY graph capture and warm-up a FLEXDRAFT verify input.

Covers `DecodeCudaGraphRunner.get_spec_info` (sglang/srt/model_executor/runner/decode_cuda_graph_runner.py) and
`create_dummy_verify_input` as `sglang/srt/model_executor/runner/base_runner.py` imports it (SGLang 0.5.23). Both build
the dummy verify input of the forward being captured or warmed up per algorithm, and return None for any algorithm
they do not name, which a TARGET_VERIFY capture cannot run with. AROUND hooks return a FlexDraftVerifyInput at the
captured width instead: like every FLEXDRAFT verify it carries no custom mask, so capture and replay agree on the
backends' causal verify path (flashinfer builds its captured wrappers without a mask buffer, `_create_prefill_wrappers`,
and refuses a replay whose mask use differs from the capture's). Every other algorithm goes straight through. Only GPU
graph capture reaches these functions.
"""

from __future__ import annotations

from . import register

GET_SPEC_INFO = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.get_spec_info"
DUMMY_INPUT = "sglang.srt.model_executor.runner.base_runner.create_dummy_verify_input"


def _is_flexdraft(spec_algorithm) -> bool:
    from ..sglang.spec import ALGORITHM

    return getattr(spec_algorithm, "name", None) == ALGORITHM


def _dummy_input(width: int):
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode

    from ..sglang.state import FlexDraftVerifyInput

    spec_info = FlexDraftVerifyInput(None, None, width)
    spec_info.capture_hidden_mode = CaptureHiddenMode.NULL
    return spec_info


def _graph_spec_info(original, runner, num_tokens):
    if not _is_flexdraft(runner.model_runner.spec_algorithm):
        return original(runner, num_tokens)
    return _dummy_input(runner.captured_req_width)


def _warmup_spec_info(original, spec_algorithm, custom_mask, num_tokens_per_req, is_draft_worker):
    if not _is_flexdraft(spec_algorithm):
        return original(spec_algorithm, custom_mask, num_tokens_per_req, is_draft_worker)
    return _dummy_input(num_tokens_per_req)


def register_hooks() -> None:
    register(GET_SPEC_INFO, _graph_spec_info, "AROUND")
    register(DUMMY_INPUT, _warmup_spec_info, "AROUND")
