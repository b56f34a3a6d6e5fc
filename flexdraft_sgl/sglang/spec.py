"""FLEXDRAFT as an SGLang speculative algorithm: its settings, the server-argument checks, and the spec class the
0.5.23 scheduler calls.

Settings come from the adapter (`--speculative-draft-model-path`): block size B, tuned depth N and the verify-length
rule. SGLang plugins cannot add CLI flags, so the rest is overridable through the environment (inherited by every
SGLang process):

    FLEXDRAFT_MODE                parallel (default) | sequential | flex (per step: plain, parallel or sequential, and
                                  the verify length, chosen by core.policy from the cost table and draft confidence)
    FLEXDRAFT_FLEX_MODES          the modes flex chooses from, comma-separated (default plain,parallel,sequential)
    FLEXDRAFT_COST_TABLE          flex mode's forward-cost table, a JSON file (`flexdraft measure-costs`, or the GPU
                                  check script's cost_table.json); default: timed by the server at start-up
    FLEXDRAFT_VERIFY_LEN          verify exactly this many drafts per step (default: the adapter's confidence rule)
    FLEXDRAFT_VERIFY_RULE         cumulative_product | min_confidence (default: the adapter's)
    FLEXDRAFT_VERIFY_THRESHOLD    the rule's threshold (default: the adapter's)
    FLEXDRAFT_PROFILE             append a step profile, one JSON line per decode step, to this file (`profile.py`)

`--speculative-num-draft-tokens W` caps the verify forward at W rows (at most W-1 drafts); it defaults to B.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..adapter import CONFIG_FILE, TARGET_CONFIG_FILE, AdapterConfig, AdapterError, TargetSpec
from ..core.confidence import RULES

logger = logging.getLogger(__name__)

ALGORITHM = "FLEXDRAFT"
MODES = ("parallel", "sequential", "flex")
FLEX_MODES = ("plain", "parallel", "sequential")  # what one flex step can be
# Backends whose TARGET_VERIFY path serves FLEXDRAFT's verify forwards, the default first: they take the width and
# the causal chain from the verify input (state.FlexDraftVerifyInput, which carries no mask). fa3 and trtllm_mha run a
# causal chain too but size it from their construction (flashattention_backend.py `speculative_num_draft_tokens`),
# and the rest have no verify path; torch_native gets one from flexdraft_sgl.patches on machines without a GPU.
MASK_BACKENDS_GPU = ("flashinfer", "triton")
MASK_BACKENDS_CPU = ("torch_native",)


def mask_backends(device: str) -> tuple[str, ...]:
    """The attention backends FLEXDRAFT can verify with on SGLang's `--device`; the first is its default."""
    return MASK_BACKENDS_CPU if device == "cpu" else MASK_BACKENDS_GPU


@dataclass(frozen=True)
class FlexDraftSettings:
    adapter_path: str
    adapter: AdapterConfig
    mode: str
    max_verify_len: int  # W - 1
    verify_len: int | None
    verify_rule: str
    verify_threshold: float
    cost_table: str | None = None
    flex_modes: tuple[str, ...] = FLEX_MODES

    @classmethod
    def resolve(cls, adapter_path: str | None, num_draft_tokens: int | None) -> FlexDraftSettings:
        if not adapter_path:
            raise ValueError(
                "FLEXDRAFT needs its adapter: pass --speculative-draft-model-path ADAPTER_DIR (a folder with "
                f"{CONFIG_FILE} and adapter.safetensors, e.g. from `flexdraft init-adapter` or training)"
            )
        config_path = Path(adapter_path) / CONFIG_FILE
        if not Path(adapter_path).is_dir():
            raise AdapterError(f"--speculative-draft-model-path {adapter_path}: no such folder")
        if not config_path.is_file() or not (Path(adapter_path) / TARGET_CONFIG_FILE).is_file():
            raise AdapterError(f"--speculative-draft-model-path {adapter_path}: not a FlexDraft adapter folder "
                               f"(it needs {CONFIG_FILE}, {TARGET_CONFIG_FILE} and adapter.safetensors)")
        adapter = AdapterConfig.from_json(config_path.read_text(), source=str(config_path))
        B = adapter.block_size
        width = B if num_draft_tokens is None else int(num_draft_tokens)
        if not 2 <= width <= B:
            raise ValueError(f"--speculative-num-draft-tokens must be between 2 and the adapter's block size {B} "
                             f"for FLEXDRAFT (one bonus row plus at most {B - 1} drafts), got {width}")
        mode = os.environ.get("FLEXDRAFT_MODE", "parallel")
        if mode not in MODES:
            raise ValueError(f"FLEXDRAFT_MODE={mode!r}: choose one of {', '.join(MODES)}")
        verify_len = os.environ.get("FLEXDRAFT_VERIFY_LEN")
        if verify_len is not None and not (verify_len.isdigit() and 1 <= int(verify_len) <= width - 1):
            raise ValueError(f"FLEXDRAFT_VERIFY_LEN={verify_len!r}: must be an integer from 1 to {width - 1}")
        rule = os.environ.get("FLEXDRAFT_VERIFY_RULE", adapter.verify_rule)
        if rule not in RULES:
            raise ValueError(f"FLEXDRAFT_VERIFY_RULE={rule!r}: choose one of {', '.join(RULES)}")
        try:
            threshold = float(os.environ.get("FLEXDRAFT_VERIFY_THRESHOLD", adapter.verify_threshold))
        except ValueError:
            raise ValueError("FLEXDRAFT_VERIFY_THRESHOLD must be a number") from None
        flex_modes = tuple(m.strip() for m in os.environ.get("FLEXDRAFT_FLEX_MODES", ",".join(FLEX_MODES)).split(","))
        if not flex_modes or any(m not in FLEX_MODES for m in flex_modes) or len(set(flex_modes)) < len(flex_modes):
            raise ValueError(f"FLEXDRAFT_FLEX_MODES={','.join(flex_modes)!r}: name one or more of "
                             f"{', '.join(FLEX_MODES)}, each once")
        cost_table = os.environ.get("FLEXDRAFT_COST_TABLE") or None
        if cost_table is not None:
            from ..core.policy import ForwardCostTable

            try:
                ForwardCostTable.load(cost_table)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"FLEXDRAFT_COST_TABLE={cost_table}: not a readable cost table ({e})") from None
        return cls(str(adapter_path), adapter, mode, width - 1, int(verify_len) if verify_len else None, rule,
                   threshold, cost_table, flex_modes)


def check_server_args(server_args) -> FlexDraftSettings:
    """Everything that can be refused before any process starts: the adapter against the target, the attention
    backend, the verify width. Returns the resolved settings. An unnamed backend is FLEXDRAFT's default by now
    (`patches/attention_backend_default.py`), so a refused one was named by the user."""
    from transformers import AutoConfig

    settings = FlexDraftSettings.resolve(server_args.speculative_draft_model_path,
                                         server_args.speculative_num_draft_tokens)
    target = AutoConfig.from_pretrained(server_args.model_path, trust_remote_code=server_args.trust_remote_code)
    settings.adapter.check_target(TargetSpec.from_hf_config(target))

    allowed = mask_backends(server_args.device)
    for flag in ("attention_backend", "decode_attention_backend", "prefill_attention_backend"):
        backend = getattr(server_args, flag, None)
        if backend is not None and backend not in allowed:
            raise ValueError(
                f"FLEXDRAFT cannot use --{flag.replace('_', '-')} {backend}: its verify path does not serve "
                f"FLEXDRAFT's verify forwards, or it has none. Attention backends that work on this machine: "
                f"{', '.join(allowed)} (the first is FLEXDRAFT's choice when none is named)"
            )
    return settings


def _spec_class():
    from sglang.srt.speculative.spec_registry import CustomSpecAlgo

    class FlexDraftSpecAlgo(CustomSpecAlgo):
        """FLEXDRAFT's identity and capabilities. The four methods below are called by the 0.5.23 scheduler but
        missing from CustomSpecAlgo."""

        def create_future_map(self, device, req_to_token_pool, needs_cpu_seq_lens=True,
                              needs_confidence_relay=False):
            from sglang.srt.managers.overlap_utils import FutureMap

            return FutureMap(device, self, req_to_token_pool, needs_cpu_seq_lens, needs_confidence_relay)

        def carries_draft_hidden_states(self) -> bool:
            return False

        def need_topk(self) -> bool:
            return False

        def get_platform_worker_cls(self):
            return None

        def has_draft_kv(self) -> bool:
            return False  # drafting reuses the target's KV; there is no draft model cache

        def handle_server_args(self, server_args) -> None:
            settings = check_server_args(server_args)
            width = settings.max_verify_len + 1
            server_args.speculative_num_draft_tokens = width
            server_args.speculative_num_steps = width - 1
            server_args.speculative_eagle_topk = 1
            server_args.enable_mixed_chunk = False
            server_args.disable_overlap_schedule = True  # the worker is synchronous (see worker.py)
            logger.info("FLEXDRAFT: adapter %s (B=%d, N=%d), mode %s, verify width %d",
                        settings.adapter_path, settings.adapter.block_size, settings.adapter.tuned_depth,
                        settings.mode, width)

    return FlexDraftSpecAlgo


def register_algorithm() -> None:
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm
    from sglang.srt.speculative.spec_registry import _REGISTRY

    from . import profile

    profile.register_hooks()  # FLEXDRAFT_PROFILE also times plain SGLang's decode steps, for comparison
    if ALGORITHM in _REGISTRY:
        return

    def worker_factory(server_args):
        from .worker import FlexDraftWorker

        return FlexDraftWorker

    SpeculativeAlgorithm.register(ALGORITHM, supports_overlap=False, spec_class=_spec_class())(worker_factory)
