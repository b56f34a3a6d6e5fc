"""FlexDraftWorker: the speculative worker SGLang's scheduler drives for `--speculative-algorithm FLEXDRAFT`.

Per request the worker carries a bonus token (decided, not yet in the KV cache) and B-1 calibrated drafts
(`state.FlexDraftState`). One `forward_batch_generation` call is one FlexDraft step:

  prefill      SGLang's own extend forward samples the first token t; the mask block after the prompt, calibrated
               with t, gives the drafts.
  parallel     a TARGET_VERIFY forward of [bonus, d1..dv] (a causal chain: no mask is built) decides the accepted
               length a and the new bonus (core.acceptance: greedy, or speculative sampling with the same filters
               on target and draft); the block after the last accepted token, calibrated with the new bonus,
               gives the next drafts. Emits a+1 tokens.
  sequential   the same verify, then a one-row forward of the new bonus gives the next exact token t, and the block
               after the bonus, calibrated with t, gives the drafts. Emits a+2 tokens.
  plain        (flex mode only) a one-row forward of the bonus; emits 1 token and keeps the drafts it has. Requests
               that join meanwhile skip the prefill's mask block and carry placeholder drafts.
Flex mode (FLEXDRAFT_MODE=flex) picks one of the three (or of those FLEXDRAFT_FLEX_MODES allows) and the verify
length per batch with `core.policy.plan_step` from the forward-cost table and the drafts' confidence. The fixed modes
verify what the confidence rule grants, capped by what acceptance measured per row supports
(`core.confidence.measured_verify_len`), unless FLEXDRAFT_VERIFY_LEN fixes the length. On a GPU every target forward
runs from the CUDA graph set of its width (`graphs.py`); verify lengths are rounded up to the sets' tiers.

Mask blocks run only through the final N layers (`drafter.MaskBlockDrafter`), never through the lower layers, and
never write the KV cache. Candidate K/V are written to the request's uncommitted window by the verify forward; the
scheduler commits `accept_lens` of them, so rejected slots are simply overwritten next step and only committed KV
ever reaches the radix cache.

The worker is synchronous (overlap scheduling off), like SGLang's NGRAM worker.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
from sglang.srt.managers.utils import GenerationBatchResult
from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode
from sglang.srt.speculative.base_spec_worker import BaseSpecWorker
from torch import Tensor

from ..adapter import FlexDraftAdapter
from ..core.acceptance import greedy_verify, speculative_verify
from ..core.confidence import measured_verify_len, verify_lengths
from ..core.policy import (COST_TABLE_ROWS, AcceptanceTracker, ForwardCostTable, Mode, cost_table_shapes,
                           measure_cost_table, plan_step, row_outcomes)
from ..core.sampling import (SamplingParams, draft_temperatures, draw, draw_drafts, filtered_probs,
                             greedy_rows)
from .drafter import MaskBlockDrafter, tp_size
from .graphs import GraphSets, tier_for, verify_tiers, widths_for_mode
from .profile import OFF, step_profile
from .spec import FlexDraftSettings
from .state import FlexDraftState, FlexDraftVerifyInput

logger = logging.getLogger(__name__)

# Measured acceptance is summed on the device and read back every this many steps: one host sync for all of them.
READBACK_STEPS = 16
# Cached tokens before the rows of each forward flex's start-up cost table times.
COST_PREFIX_LEN = 64


class FlexDraftWorker(BaseSpecWorker):
    profile = OFF  # the step profile, set in __init__ when FLEXDRAFT_PROFILE asks for one

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
        # flex's forward costs: FLEXDRAFT_COST_TABLE's, or timed on this server once its forwards can run
        self.cost_table = ForwardCostTable.load(self.settings.cost_table) if self.settings.cost_table else None
        self.graphs: GraphSets | None = None  # built in init_cuda_graphs on a GPU
        # Verify lengths a step may run: every one eagerly; the graph sets' tiers once graphs exist.
        self.verify_caps = tuple(range(1, self.settings.max_verify_len + 1))
        self._head_share = 0.0  # the LM head's share of the target's weights: set with the drafter
        self.flex_modes = tuple(Mode(m) for m in self.settings.flex_modes)
        # flex's mode at its last plan; plain from the start when flex can only decode plainly (no prefill drafting)
        only_plain = self.settings.mode == "flex" and self.flex_modes == (Mode.PLAIN,)
        self._flex_mode: Mode | None = Mode.PLAIN if only_plain else None
        self._placeholders_logged = False
        self.acceptance = AcceptanceTracker(self.settings.max_verify_len)  # measured acceptance per draft row
        self._outcomes: Tensor | None = None  # row_outcomes summed on the device since the last read-back
        self._outcome_steps = self._outcome_requests = 0
        self._verify_cap = self.settings.max_verify_len  # optimistic until measured
        self.profile = step_profile(self.device)  # FLEXDRAFT_PROFILE: time each decode step's parts

    @property
    def draft_worker(self):
        return None

    @property
    def _tracking(self) -> bool:
        """Measured acceptance is kept where a plan reads it: flex's scale, the confidence rule's cap."""
        return self.settings.mode == "flex" or self.settings.verify_len is None

    def alloc_memory_pool(self, **kwargs):
        super().alloc_memory_pool(**kwargs)
        self.req_to_token_pool, self.token_to_kv_pool_allocator = self.target_worker.get_memory_pool()
        self.drafter = MaskBlockDrafter(self.model_runner.model, self.adapter, self.model_runner.token_to_kv_pool,
                                        self.req_to_token_pool.req_to_token, self.profile)
        self._head_share = head_share(self.model_runner.model)
        self.profile.wrap(self.drafter.head, "compact", "lm_head")

    def init_cuda_graphs(self):
        """After SGLang captured its verify graphs at the widest width: the other widths this mode runs."""
        super().init_cuda_graphs()
        # The attention backend exists by now: its per-forward planning (on CPU the verify patch's per-request masks
        # and KV indices) is timed inside each forward.
        self.profile.wrap(self.model_runner.attn_backend, "init_forward_metadata", "attn_metadata")
        if str(self.device).startswith("cuda"):
            fixed = self.settings.verify_len
            tiers = (fixed,) if fixed is not None else verify_tiers(self.settings.max_verify_len)
            self.graphs = GraphSets(self.model_runner)
            self.graphs.register_startup(self.settings.max_verify_len + 1)
            self.graphs.build(widths_for_mode(self.settings.mode, tiers))
            self.verify_caps = tiers
        if self.settings.mode == "flex" and self.cost_table is None:
            self.cost_table = self._measure_cost_table()

    def _measure_cost_table(self) -> ForwardCostTable:
        """flex's cost table, timed on this server's own target forwards (graphs included): one-row requests (plain
        steps) and requests of the widest verify width, each after COST_PREFIX_LEN cached tokens. The dummy requests
        read and write only the padding slot 0, which the KV pool never hands out."""
        width = self.settings.max_verify_len + 1
        synchronize = torch.cuda.synchronize if str(self.device).startswith("cuda") else (lambda: None)
        max_requests, context = self.req_to_token_pool.req_to_token.shape
        prefix_len = min(COST_PREFIX_LEN, context - width)
        # No more requests than the server runs at once (attention backends size their buffers by it).
        shapes = [s for s in cost_table_shapes(COST_TABLE_ROWS, width) if s[0] < max_requests]

        def prepare(requests: int, rows_each: int):
            batch = SimpleNamespace(req_pool_indices=torch.zeros(requests, dtype=torch.int64, device=self.device),
                                    spec_algorithm=self.model_runner.spec_algorithm)
            prefix = torch.full((requests,), prefix_len, dtype=torch.int64, device=self.device)
            tokens = torch.zeros(requests, rows_each, dtype=torch.long, device=self.device)

            def forward():
                self._forward_rows(batch, prefix, tokens)
                synchronize()
            return forward

        with torch.no_grad():  # not inference mode: buffers made now are written in place when serving
            table = measure_cost_table(prepare, shapes)
        if tp_size() > 1:  # every rank must plan the same steps: they share one table, the ranks' mean
            from sglang.srt.distributed import tensor_model_parallel_all_reduce

            seconds = torch.tensor(table.seconds, dtype=torch.float32, device=self.device)
            seconds = tensor_model_parallel_all_reduce(seconds) / tp_size()
            table = ForwardCostTable(table.rows, tuple(seconds.tolist()))
        logger.info("FLEXDRAFT flex: forward costs measured at start-up (set FLEXDRAFT_COST_TABLE to skip): %s",
                    ", ".join(f"{r} rows {1000 * t:.1f} ms" for r, t in zip(table.rows, table.seconds)))
        return table

    # ---- entry point -------------------------------------------------------------------------------------------
    def forward_batch_generation(self, batch, on_publish=None, grammar_barrier=None, pp_proxy_tensors=None):
        if batch.forward_mode.is_extend():
            result = self._prefill(batch)
        elif batch.forward_mode.is_decode():
            with self.profile.step(bs=len(batch.seq_lens)):
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
        if self._flex_mode is Mode.PLAIN:  # flex decodes plainly now: a mask-block pass would be thrown away
            result.next_draft_input = self._placeholder_drafts(first, batch.sampling_info)
        else:
            result.next_draft_input = self._draft(batch.req_pool_indices, batch.seq_lens, first,
                                                  batch.sampling_info)
        return result

    def _decode(self, batch) -> GenerationBatchResult:
        state: FlexDraftState = batch.spec_info
        params = _sampling_params(batch.sampling_info)
        prof = self.profile
        with prof.section("plan"):
            mode, v = self._plan(state)
        prof.note(mode=mode.value, width=v + 1)
        committed = batch.seq_lens
        drafts = state.drafts[:, :v]
        with prof.section("verify"):
            tokens = torch.cat([state.bonus[:, None], drafts], 1)
            logits, verify_result = self._forward_rows(batch, committed, tokens)
        with prof.section("acceptance"):
            accepted, bonus = self._accept(drafts, state, logits, params)
        if self._tracking:
            self._track(mode, state.draft_top[:, :v], accepted)

        bs, stride = len(committed), self.block_size + 1
        out = torch.zeros(bs, stride, dtype=torch.long, device=committed.device)
        out[:, :v] = drafts
        rows = torch.arange(bs, device=committed.device)
        out[rows, accepted] = bonus
        lens = committed + accepted.to(committed.dtype) + 1  # c0..ca are now committed
        # The logits each emitted token was drawn from, for logprobs. A second forward overwrites a graph's logits
        # (every DecodeCudaGraphRunner writes the one GraphSharedOutput buffer), so they are kept first.
        second_forward = mode is Mode.SEQUENTIAL
        logits_per_token = [logits.clone() if batch.return_logprob and second_forward else logits]
        emitted, resolved = accepted + 1, bonus
        if second_forward:  # push the bonus through the target for one exact token
            with prof.section("bonus"):
                bonus_logits, _ = self._forward_rows(batch, lens, bonus[:, None])
                with prof.section("sample"):
                    resolved = draw(bonus_logits[:, 0], params, self.generator, batch.sampling_info.is_all_greedy)
            out[rows, accepted + 1] = resolved
            logits_per_token.append(bonus_logits)
            lens = lens + 1
            emitted = accepted + 2
        if batch.return_logprob:
            _attach_logprobs(batch, verify_result.logits_output, logits_per_token, accepted, out)
        if mode is Mode.PLAIN:  # no drafting: the drafts wait for a step that verifies them (still lossless)
            next_state = FlexDraftState(bonus, state.drafts, state.draft_top, state.sampled, state.draft_probs)
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
        mode with the fixed length, or the longest the confidence rule grants any request within the cap measured
        acceptance supports; or flex's plan."""
        if self.settings.mode != "flex":
            if self.settings.verify_len is not None:
                v = self.settings.verify_len
            else:
                lens = verify_lengths(state.draft_top, self.settings.verify_rule, self.settings.verify_threshold,
                                      max_len=self.settings.max_verify_len)
                with self.profile.section("host_sync"):
                    v = min(int(lens.max()), self._verify_cap)
            return Mode(self.settings.mode), tier_for(v, self.verify_caps)
        cfg = self.adapter.config
        caps = (self.settings.verify_len,) if self.settings.verify_len is not None else self.verify_caps
        plan = plan_step(state.draft_top[:, : self.settings.max_verify_len].float(), self.cost_table,
                         block_size=self.block_size, tuned_depth=cfg.tuned_depth, num_layers=cfg.target.num_layers,
                         rule=self.settings.verify_rule, threshold=self.settings.verify_threshold,
                         modes=self.flex_modes, fused_parallel=False, verify_caps=caps,
                         acceptance_scale=self.acceptance.scale, head_share=self._head_share,
                         draft_head_fraction=cfg.draft_head_fraction)
        if plan.mode is not self._flex_mode:  # logged on change only: one line per switch
            self._flex_mode, self._placeholders_logged = plan.mode, False
            logger.info("FLEXDRAFT flex: %s mode from a batch of %d (predicted %s tokens/s; acceptance %.2f of "
                        "what confidence predicts)", plan.mode.value, len(state.bonus),
                        ", ".join(f"{m.value} {r:.3g}" for m, r in plan.predicted.items()), self.acceptance.scale)
        return plan.mode, int(plan.verify_lens.max())

    def _track(self, mode: Mode, top: Tensor, accepted: Tensor) -> None:
        """Measured acceptance of this step's verified drafts (`top`: their confidence), summed on the device and
        read back every READBACK_STEPS steps, when the fixed modes' cap follows it."""
        if mode is Mode.PLAIN:  # flex: nothing verified
            self.acceptance.idle()
            return
        outcomes = row_outcomes(accepted, top, self.settings.max_verify_len)
        self._outcomes = outcomes if self._outcomes is None else self._outcomes.add_(outcomes)
        self._outcome_steps += 1
        self._outcome_requests += len(accepted)
        if self._outcome_steps < READBACK_STEPS:
            return
        with self.profile.section("host_sync"):
            outcomes = self._outcomes.cpu()
        self.acceptance.observe(outcomes, self._outcome_requests)
        self._outcomes, self._outcome_steps, self._outcome_requests = None, 0, 0
        if self.settings.mode == "flex":  # flex reads the scale
            return
        rates = self.acceptance.rates
        cap = measured_verify_len(rates, self.settings.verify_rule, self.settings.verify_threshold, self._verify_cap)
        if cap != self._verify_cap:  # logged on change only
            logger.info("FLEXDRAFT: verify length capped at %d of %d drafts by measured acceptance (per row: %s)",
                        cap, self.settings.max_verify_len, " ".join(f"{r:.2f}" for r in rates.tolist()))
            self._verify_cap = cap

    def _forward_rows(self, batch, prefix_lens: Tensor, tokens: Tensor):
        """A TARGET_VERIFY forward of `tokens` [bs, W] at positions prefix_lens.. as a causal chain after each
        request's prefix (no custom mask: see FlexDraftVerifyInput); their K/V go to the request's window after
        prefix_lens. Returns logits [bs, W, V] (under CUDA graphs a view of the buffer all graph runners share,
        valid until the next target forward) and the target worker's result."""
        bs, width = tokens.shape
        prof = self.profile
        with prof.section("batch"):
            # The one host copy: SGLang's attention planning reads host lengths (and syncs for its own plan anyway).
            with prof.section("host_sync"):
                prefix_lens_cpu = prefix_lens.cpu()
            if self.graphs is not None:
                self.graphs.activate(width)
            prefix = prefix_lens.to(torch.long)
            positions = prefix[:, None] + torch.arange(width, device=prefix.device)
            req_to_token = self.req_to_token_pool.req_to_token
            out_cache_loc = req_to_token[batch.req_pool_indices.long()[:, None], positions].to(torch.int64)
            spec_info = FlexDraftVerifyInput(tokens.reshape(-1), positions.reshape(-1), width)
            forward_batch = ForwardBatch(
                forward_mode=ForwardMode.TARGET_VERIFY,
                batch_size=bs,
                input_ids=tokens.reshape(-1),
                req_pool_indices=batch.req_pool_indices,
                seq_lens=prefix_lens,
                out_cache_loc=out_cache_loc.reshape(-1),
                seq_lens_sum=int(prefix_lens_cpu.sum()),
                seq_lens_cpu=prefix_lens_cpu,
                positions=positions.reshape(-1),
                spec_algorithm=batch.spec_algorithm,
                spec_info=spec_info,
                capture_hidden_mode=CaptureHiddenMode.NULL,
                return_hidden_states_before_norm=False,
            )
            self.model_runner.kv_index_translator.bind_own_plan(forward_batch)
        with prof.section("forward"):
            result = self.target_worker.forward_batch_generation(batch=None, forward_batch=forward_batch,
                                                                 is_verify=True)
        return result.logits_output.next_token_logits.view(bs, width, -1), result

    def _accept(self, drafts, state: FlexDraftState, logits, params) -> tuple[Tensor, Tensor]:
        """Greedy requests accept by argmax; sampling requests (`state.sampled`) by speculative sampling against
        their kept draft distributions, with V-sized target distributions for their rows only."""
        if drafts.shape[1] == 0:  # a plain step: nothing to accept, the bonus is drawn from the target alone
            zero = torch.zeros(len(drafts), dtype=torch.long, device=drafts.device)
            return zero, draw(logits[:, 0], params, self.generator, state.sampled is None)
        verify = torch.full((len(drafts),), drafts.shape[1], device=drafts.device)
        accepted, bonus = greedy_verify(drafts, logits.argmax(-1), verify)
        rows = state.sampled.nonzero().squeeze(1) if state.sampled is not None else ()
        if not len(rows):
            return accepted, bonus
        p = filtered_probs(logits[rows], params.select(rows))
        accepted[rows], bonus[rows] = speculative_verify(drafts[rows], state.draft_probs[:, : drafts.shape[1]], p,
                                                         verify[rows], self.generator)
        return accepted, bonus

    def _placeholder_drafts(self, bonus: Tensor, sampling_info) -> FlexDraftState:
        """Drafts for requests that join while flex decodes plainly, made without the mask-block pass: the bonus
        repeated, with each row's measured acceptance as its confidence so that the plan weighs them as typical
        drafts. The step that first verifies them wastes its rows (losslessly: a sampling request's draft
        distribution is one-hot on its placeholder, which speculative sampling accepts with the target's own
        probability) and drafts for real after it."""
        if not self._placeholders_logged:
            logger.info("FLEXDRAFT flex: requests join without a mask-block pass while decoding is plain")
            self._placeholders_logged = True
        bs, width = len(bonus), self.block_size - 1
        drafts = bonus[:, None].expand(bs, width).clone()
        rates = self.acceptance.rates[:width].to(bonus.device, torch.float32)
        top = torch.nn.functional.pad(rates, (0, width - len(rates))).expand(bs, width).clone()
        if sampling_info.is_all_greedy:
            return FlexDraftState(bonus, drafts, top)
        sampled = ~greedy_rows(_sampling_params(sampling_info))
        probs = torch.nn.functional.one_hot(drafts[sampled], self.model_runner.model_config.vocab_size).float()
        return FlexDraftState(bonus, drafts, top, sampled, probs)

    def _draft(self, req_pool_indices, committed_lens, bonus, sampling_info) -> FlexDraftState:
        params, greedy = _sampling_params(sampling_info), sampling_info.is_all_greedy
        with self.profile.section("mask_block"):
            calibrated = self.drafter.calibrated_drafts(req_pool_indices, committed_lens, bonus,
                                                        draft_temperatures(params, greedy))
        if greedy:
            return FlexDraftState(bonus, calibrated.tokens, calibrated.top)
        # Only sampling requests draw their drafts and keep the distribution (a greedy draft is the argmax).
        with self.profile.section("draft_sampling"):
            sampled = ~greedy_rows(params)
            rows = sampled.nonzero().squeeze(1)
            drafts = calibrated.tokens.clone()
            drafts[rows], probs, _ = draw_drafts(calibrated.select(rows), params.select(rows), self.generator, False)
        return FlexDraftState(bonus, drafts, calibrated.top, sampled, probs)


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


def head_share(model) -> float:
    """The LM head's share of the weights a decode step reads (embeddings aside): what the flex policy charges a mask
    block's pass through the head (`core.policy.deep_pass_weight`). With tensor parallelism every share is per rank."""
    head = model.lm_head.weight.numel()
    layers = sum(p.numel() for p in model.model.layers.parameters())
    return head / (head + layers)


def _sampling_params(sampling_info) -> SamplingParams:
    """SGLang's per-request settings in FlexDraft's form. SGLang encodes greedy as temperature 1 with top_k 1,
    which the filters turn into the same one-hot distribution."""
    return SamplingParams(sampling_info.temperatures.view(-1).float(), sampling_info.top_ks.to(torch.long),
                          sampling_info.top_ps.float())
