"""FlexDraftWorker: the speculative worker SGLang's scheduler drives for `--speculative-algorithm FLEXDRAFT`.

Per request the worker carries a bonus token (decided, not yet in the KV cache) and B-1 calibrated drafts
(`state.FlexDraftState`). One `forward_batch_generation` call is one FlexDraft step:

  prefill      SGLang's own extend forward samples the first token t; the mask block after the prompt, calibrated
               with t, gives the drafts.
  parallel     a TARGET_VERIFY forward of [bonus, d1..dv] (causal FULL_MASK from core.masks) decides the accepted
               length a and the new bonus (core.acceptance: greedy, or speculative sampling with the same filters
               on target and draft); the block after the last accepted token, calibrated with the new bonus,
               gives the next drafts. Emits a+1 tokens.
  sequential   the same verify, then a one-row forward of the new bonus gives the next exact token t, and the block
               after the bonus, calibrated with t, gives the drafts. Emits a+2 tokens.
  plain        (flex mode only) a one-row forward of the bonus; emits 1 token and keeps the drafts it has.
Flex mode (FLEXDRAFT_MODE=flex) picks one of the three and the verify length per batch with `core.policy.plan_step`
from the forward-cost table and the drafts' confidence. On a GPU every target forward runs from the CUDA graph set of
its width (`graphs.py`); verify lengths are rounded up to the sets' tiers.

Mask blocks run only through the final N layers (`drafter.MaskBlockDrafter`), never through the lower layers, and
never write the KV cache. Candidate K/V are written to the request's uncommitted window by the verify forward; the
scheduler commits `accept_lens` of them, so rejected slots are simply overwritten next step and only committed KV
ever reaches the radix cache.

The worker is synchronous (overlap scheduling off), like SGLang's NGRAM worker.
"""

from __future__ import annotations

import logging

import torch
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from torch import Tensor

from ..adapter import FlexDraftAdapter
from ..core.acceptance import greedy_verify, speculative_verify
from ..core.confidence import expected_tokens, verify_lengths
from ..core.layout import verify_layout
from ..core.masks import full_mask
from ..core.policy import AcceptanceTracker, ForwardCostTable, Mode, default_cost_table, plan_step
from ..core.sampling import SamplingParams, draft_temperatures, draw, draw_drafts, filtered_probs
from .drafter import MaskBlockDrafter
from .graphs import GraphSets, tier_for, verify_tiers, widths_for_mode
from .spec import FlexDraftSettings
from .state import FlexDraftState, FlexDraftVerifyInput, one_hot

logger = logging.getLogger(__name__)


class FlexDraftWorker(BaseSpecWorker):
    def __init__(self, server_args, gpu_id: int, nccl_port: int, target_worker):
        super().__init__()
        self.server_args = server_args
        self._target_worker = target_worker
        self._draft_worker = None  # self-drafting: no draft model
        self.model_runner = target_worker.model_runner
        self.device = self.model_runner.device
        self.settings = FlexDraftSettings.resolve(server_args.speculative_draft_model_path,
                                                  server_args.speculative_num_draft_tokens)
        hf_config = self.model_runner.model_config.hf_config
        self.adapter = FlexDraftAdapter.load(self.settings.adapter_path, target_config=hf_config)
        self.block_size = self.adapter.config.block_size
        self.generator = torch.Generator(device=self.device).manual_seed(server_args.random_seed or 0)
        self.drafter: MaskBlockDrafter | None = None  # needs the KV pool: built in alloc_memory_pool
        self.cost_table = (ForwardCostTable.load(self.settings.cost_table) if self.settings.cost_table
                           else default_cost_table())
        self.graphs: GraphSets | None = None  # built in init_cuda_graphs on a GPU
        # Verify lengths a step may run: every one eagerly; the graph sets' tiers once graphs exist.
        self.verify_caps = tuple(range(1, self.settings.max_verify_len + 1))
        self._flex_mode: Mode | None = None
        self.acceptance = AcceptanceTracker()  # flex: realized against predicted acceptance

    @property
    def draft_worker(self):
        return None

    def alloc_memory_pool(self, **kwargs):
        super().alloc_memory_pool(**kwargs)
        self.req_to_token_pool, self.token_to_kv_pool_allocator = self.target_worker.get_memory_pool()
        self.drafter = MaskBlockDrafter(self.model_runner.model, self.adapter, self.model_runner.token_to_kv_pool,
                                        self.req_to_token_pool.req_to_token)

    def init_cuda_graphs(self):
        """After SGLang captured its verify graphs at the widest width: the other widths this mode runs."""
        super().init_cuda_graphs()
        if not str(self.device).startswith("cuda"):
            return
        fixed = self.settings.verify_len
        tiers = (fixed,) if fixed is not None else verify_tiers(self.settings.max_verify_len)
        self.graphs = GraphSets(self.model_runner)
        self.graphs.register_startup(self.settings.max_verify_len + 1)
        self.graphs.build(widths_for_mode(self.settings.mode, tiers))
        self.verify_caps = tiers

    # ---- entry point -------------------------------------------------------------------------------------------
    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None, pp_proxy_tensors=None):
        if batch.forward_mode.is_extend():
            result = self._prefill(batch)
        elif batch.forward_mode.is_decode():
            result = self._decode(batch)
        else:
            raise RuntimeError(f"FLEXDRAFT cannot run a {batch.forward_mode.name} batch (DP attention is unsupported)")
        if on_publish is not None:
            on_publish(result.new_seq_lens)
        return result

    # ---- steps -------------------------------------------------------------------------------------------------
    def _prefill(self, batch) -> GenerationBatchResult:
        result = self.target_worker.forward_batch_generation(batch)
        first = result.next_token_ids.reshape(-1).to(torch.long)
        result.new_seq_lens = batch.seq_lens
        result.next_draft_input = self._draft(batch.req_pool_indices, batch.seq_lens, first, batch.sampling_info)
        return result

    def _decode(self, batch) -> GenerationBatchResult:
        state: FlexDraftState = batch.spec_info
        params = _sampling_params(batch.sampling_info)
        mode, v = self._plan(state)
        committed = batch.seq_lens
        drafts = state.drafts[:, :v]
        tokens = torch.cat([state.bonus[:, None], drafts], 1)
        logits, verify_result = self._forward_rows(batch, committed, tokens)
        accepted, bonus = self._accept(drafts, state, logits, params, batch.sampling_info.is_all_greedy)
        if self.settings.mode == "flex":  # only flex plans with it: fixed modes keep the two host syncs off their path
            self._track_acceptance(mode, state, accepted, v)

        bs, stride = len(committed), self.block_size + 1
        out = torch.zeros(bs, stride, dtype=torch.long, device=committed.device)
        out[:, :v] = drafts
        rows = torch.arange(bs, device=committed.device)
        out[rows, accepted] = bonus
        lens = committed + accepted.to(committed.dtype) + 1  # c0..ca are now committed
        logits_per_token = [logits]  # the logits each emitted token was drawn from, for logprobs
        emitted, resolved = accepted + 1, bonus
        if mode is Mode.SEQUENTIAL:  # push the bonus through the target for one exact token
            bonus_logits, _ = self._forward_rows(batch, lens, bonus[:, None])
            resolved = draw(bonus_logits[:, 0], params, self.generator, batch.sampling_info.is_all_greedy)
            out[rows, accepted + 1] = resolved
            logits_per_token.append(bonus_logits)
            lens = lens + 1
            emitted = accepted + 2
        if batch.return_logprob:
            _attach_logprobs(batch, verify_result.logits_output, logits_per_token, accepted, out)
        if mode is Mode.PLAIN:  # no drafting: the drafts wait for a step that verifies them (still lossless)
            next_state = FlexDraftState(bonus, state.drafts, state.draft_top, state.draft_probs)
        else:
            next_state = self._draft(batch.req_pool_indices, lens, resolved, batch.sampling_info)
        return GenerationBatchResult(
            logits_output=verify_result.logits_output,
            next_token_ids=out.reshape(-1),
            accept_lens=emitted.to(torch.int32),
            new_seq_lens=lens,
            next_draft_input=next_state,
            speculative_num_draft_tokens=self.settings.max_verify_len + 1,
            speculative_output_stride=stride,
            num_non_draft_tokens_per_req=2 if mode is Mode.SEQUENTIAL else 1,
            can_run_cuda_graph=verify_result.can_run_cuda_graph,
        )

    # ---- pieces ------------------------------------------------------------------------------------------------
    def _plan(self, state: FlexDraftState) -> tuple[Mode, int]:
        """This step's mode and its one verify length (SGLang's verify forward is uniform per request): the fixed
        mode with the fixed length or the longest the confidence rule grants any request; or flex's plan."""
        if self.settings.mode != "flex":
            if self.settings.verify_len is not None:
                v = self.settings.verify_len
            else:
                v = int(verify_lengths(state.draft_top, self.settings.verify_rule, self.settings.verify_threshold,
                                       max_len=self.settings.max_verify_len).max())
            return Mode(self.settings.mode), tier_for(v, self.verify_caps)
        cfg = self.adapter.config
        caps = (self.settings.verify_len,) if self.settings.verify_len is not None else self.verify_caps
        plan = plan_step(state.draft_top[:, : self.settings.max_verify_len].float(), self.cost_table,
                         block_size=self.block_size, tuned_depth=cfg.tuned_depth, num_layers=cfg.target.num_layers,
                         rule=self.settings.verify_rule, threshold=self.settings.verify_threshold,
                         fused_parallel=False, verify_caps=caps, acceptance_scale=self.acceptance.scale)
        if plan.mode is not self._flex_mode:  # logged on change only: one line per switch
            self._flex_mode = plan.mode
            logger.info("FLEXDRAFT flex: %s mode from a batch of %d (predicted %s tokens/s; acceptance %.2f of "
                        "what confidence predicts)", plan.mode.value, len(state.bonus),
                        ", ".join(f"{m.value} {r:.3g}" for m, r in plan.predicted.items()), self.acceptance.scale)
        return plan.mode, int(plan.verify_lens.max())

    def _track_acceptance(self, mode: Mode, state: FlexDraftState, accepted: Tensor, v: int) -> None:
        if mode is Mode.PLAIN:
            self.acceptance.idle()
            return
        predicted = expected_tokens(state.draft_top[:, :v].double(), torch.full_like(accepted, v)) - 1
        self.acceptance.observe(float(accepted.sum()), float(predicted.sum()))

    def _forward_rows(self, batch, prefix_lens: Tensor, tokens: Tensor):
        """A TARGET_VERIFY forward of `tokens` [bs, W] at positions prefix_lens.. under a causal mask; their K/V go
        to the request's window after prefix_lens. Returns logits [bs, W, V] and the target worker's result."""
        bs, width = tokens.shape
        if self.graphs is not None:
            self.graphs.activate(width)
        prefix = prefix_lens.to(torch.long)
        positions = prefix[:, None] + torch.arange(width, device=prefix.device)
        req_to_token = self.req_to_token_pool.req_to_token
        out_cache_loc = req_to_token[batch.req_pool_indices.long()[:, None], positions].to(torch.int64)
        mask = full_mask(verify_layout(prefix.cpu(), [width - 1] * bs, self.block_size)).to(tokens.device)
        spec_info = FlexDraftVerifyInput(tokens.reshape(-1), mask, positions.reshape(-1), width)
        forward_batch = ForwardBatch(
            forward_mode=ForwardMode.TARGET_VERIFY,
            batch_size=bs,
            input_ids=tokens.reshape(-1),
            req_pool_indices=batch.req_pool_indices,
            seq_lens=prefix_lens,
            out_cache_loc=out_cache_loc.reshape(-1),
            seq_lens_sum=int(prefix.sum()),
            seq_lens_cpu=prefix.cpu(),
            positions=positions.reshape(-1),
            spec_algorithm=batch.spec_algorithm,
            spec_info=spec_info,
            capture_hidden_mode=CaptureHiddenMode.NULL,
            return_hidden_states_before_norm=False,
        )
        self.model_runner.kv_index_translator.bind_own_plan(forward_batch)
        result = self.target_worker.forward_batch_generation(batch=None, forward_batch=forward_batch,
                                                             is_verify=True)
        return result.logits_output.next_token_logits.view(bs, width, -1), result

    def _accept(self, drafts, state: FlexDraftState, logits, params, all_greedy: bool):
        verify = torch.full((len(drafts),), drafts.shape[1], device=drafts.device)
        if all_greedy:
            return greedy_verify(drafts, logits.argmax(-1), verify)
        q = state.draft_probs
        if q is None:  # drafted while every request was greedy
            q = one_hot(state.drafts, logits.shape[-1], torch.float32)
        return speculative_verify(drafts, q[:, : drafts.shape[1]], filtered_probs(logits, params), verify,
                                  self.generator)

    def _draft(self, req_pool_indices, committed_lens, bonus, sampling_info) -> FlexDraftState:
        params, greedy = _sampling_params(sampling_info), sampling_info.is_all_greedy
        calibrated = self.drafter.calibrated_drafts(req_pool_indices, committed_lens, bonus,
                                                    draft_temperatures(params, greedy))
        drafts, probs, top = draw_drafts(calibrated, params, self.generator, greedy)
        return FlexDraftState(bonus, drafts, top, probs)


def _attach_logprobs(batch, logits_output, logits_per_token: list[Tensor], accepted: Tensor, out: Tensor) -> None:
    """Fill the logprob fields SGLang returns, through its own `compute_spec_logprobs`: emitted token j of a request
    comes from verify row j (drafts, then the bonus at row `accepted`), and in sequential mode the last one from the
    bonus forward's row. Padding entries point at an all-zero row so they never overwrite a real one."""
    from sglang.srt.layers.logprob_processor import compute_spec_logprobs

    bs, stride = out.shape
    width, vocab = logits_per_token[0].shape[1:]
    table = torch.cat([*logits_per_token, logits_per_token[0].new_zeros(bs, 1, vocab)], 1)  # [bs, R, V]
    per_request = table.shape[1]
    j = torch.arange(stride, device=out.device)[None, :]
    row = torch.where(j <= accepted[:, None], j, per_request - 1)
    if len(logits_per_token) > 1:
        row[torch.arange(bs, device=out.device), accepted + 1] = width
    index = torch.arange(bs, device=out.device)[:, None] * per_request + row
    predict = torch.zeros(bs * per_request, dtype=torch.long, device=out.device)
    predict[index.reshape(-1)] = out.reshape(-1)
    logits_output.next_token_logits = table.reshape(bs * per_request, vocab)
    compute_spec_logprobs(batch, logits_output, predict, accept_index=index)


def _sampling_params(sampling_info) -> SamplingParams:
    """SGLang's per-request settings in FlexDraft's form. SGLang encodes greedy as temperature 1 with top_k 1,
    which the filters turn into the same one-hot distribution."""
    return SamplingParams(sampling_info.temperatures.view(-1).float(), sampling_info.top_ks.to(torch.long),
                          sampling_info.top_ps.float())
