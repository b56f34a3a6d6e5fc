"""Mask rows inside SGLang: the kept mask block's pass through the target's final N layers, and its calibration.

After a verification the accepted tokens' K/V are in SGLang's KV pool, so the block that FlexDraft keeps (the one
anchored after the last committed token) can run on its own: its B rows enter layer s = L - N with the mask
embedding, use the adapter's tuned projectors in each of the final N layers (SGLang parallel linears, sharded like
the target's), and the target's own norms, rotary embedding and MLP. Each row attends to the request's committed
K/V in the pool and to all rows of its block (bidirectional), exactly the visibility of `core.masks` for a block
anchored after the last committed token; the rows' own K/V never enter the pool. That attention is two parts merged
by log-sum-exp (`kernels.mask_attention`: FlashInfer's paged prefill over the pool plus a ragged prefill over the
block on a GPU, the same computation in PyTorch elsewhere), and calibration with the argmax, confidence and sampling
distribution the next step reads is one pass over the vocabulary (`kernels.calibration`: Triton on a GPU).

This is the reference engine's parallel-mode block (the same rows see the same K/V), computed after acceptance
instead of for every hypothesis inside the verify forward: B mask rows per request instead of (v+1)*B, at the price
of reading the final N layers' weights a second time.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..adapter import FlexDraftAdapter
from ..core.sampling import CalibratedDrafts
from ..kernels.calibration import calibrated_drafts
from ..kernels.mask_attention import FlashInferMaskAttention, attend, flashinfer_available
from ..patches.cpu_linear import cpu_linear
from .profile import OFF


def tp_size() -> int:
    from sglang.srt.runtime_context import get_parallel

    return get_parallel().tp_size


def mlp_output(mlp: nn.Module, h: Tensor) -> Tensor:
    """The MLP's output summed over tensor-parallel ranks. SGLang's Llama / Qwen2 / Qwen3 decoder layers build it
    with `down_proj.reduce_results=False` and sum in their stage boundary, which mask rows skip (models/llama.py
    `reduce_results=not stage_boundaries`; qwen2.py, qwen3.py `reduce_results=False`), so the sum is done here; an
    MLP built to reduce itself (RowParallelLinear.forward, layers/linear.py) must not be reduced twice."""
    out = mlp(h)
    if tp_size() > 1 and not mlp.down_proj.reduce_results:
        from sglang.srt.distributed import tensor_model_parallel_all_reduce

        out = tensor_model_parallel_all_reduce(out)
    return out


def _sglang_workspace(device) -> Tensor:
    """The FlashInfer float workspace SGLang's flashinfer backend shares among all its wrappers (`get_buffer(
    "flashinfer_workspace")`, layers/attention/flashinfer_backend.py), so the mask block costs no memory of its own
    and gets SGLang's size (SGLANG_FLASHINFER_WORKSPACE_SIZE: 384 MiB, 512 MiB for Qwen2/Qwen3); created at that size
    when the target runs another backend. Only scratch of a running kernel lives there, and the mask block runs
    between target forwards on the same stream."""
    from sglang.srt.environ import envs
    from sglang.srt.runtime_context import get_buffer

    size = envs.SGLANG_FLASHINFER_WORKSPACE_SIZE.get()
    return get_buffer("flashinfer_workspace", lambda: torch.empty(size, dtype=torch.uint8, device=device))


class TunedProjectors(nn.Module):
    """One layer's mask-row projectors as SGLang parallel linears, loaded from the adapter's plain tensors through
    the linears' own weight loaders (so tensor parallelism shards them exactly like the target's)."""

    def __init__(self, target_attention: nn.Module, tuned, dtype: torch.dtype, device):
        super().__init__()
        from sglang.srt.layers.layernorm import RMSNorm
        from sglang.srt.layers.linear import QKVParallelLinear, RowParallelLinear

        a = target_attention
        hidden = tuned.q_proj.in_features
        head_dim = a.head_dim
        self.q_size, self.kv_size, self.head_dim = a.q_size, a.kv_size, head_dim
        with torch.device(device):
            self.qkv_proj = QKVParallelLinear(hidden, head_dim, a.total_num_heads, a.total_num_kv_heads,
                                              bias=tuned.q_proj.bias is not None, params_dtype=dtype)
            self.o_proj = RowParallelLinear(a.total_num_heads * head_dim, hidden, bias=tuned.o_proj.bias is not None,
                                            reduce_results=True, params_dtype=dtype)
            self.q_norm = self.k_norm = None
            if tuned.q_norm is not None:
                self.q_norm = RMSNorm(head_dim, eps=tuned.q_norm.eps)
                self.k_norm = RMSNorm(head_dim, eps=tuned.k_norm.eps)
        loader = self.qkv_proj.weight_loader
        for shard, linear in (("q", tuned.q_proj), ("k", tuned.k_proj), ("v", tuned.v_proj)):
            loader(self.qkv_proj.weight, linear.weight.detach().to(dtype), shard)
            if linear.bias is not None:
                loader(self.qkv_proj.bias, linear.bias.detach().to(dtype), shard)
        self.o_proj.weight_loader(self.o_proj.weight, tuned.o_proj.weight.detach().to(dtype))
        if tuned.o_proj.bias is not None:
            self.o_proj.weight_loader(self.o_proj.bias, tuned.o_proj.bias.detach().to(dtype))
        if self.q_norm is not None:
            with torch.no_grad():
                self.q_norm.weight.copy_(tuned.q_norm.weight)
                self.k_norm.weight.copy_(tuned.k_norm.weight)
        self.to(dtype=dtype)

    def qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        qkv, _ = self.qkv_proj(h)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None:  # Qwen3: per-head norms before the rotary embedding
            shape = q.shape[:-1]
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(*shape, -1)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(*shape, -1)
        return q, k, v


class MaskBlockDrafter(nn.Module):
    """Runs kept mask blocks through the target's final N layers and calibrates them into draft logits."""

    def __init__(self, model: nn.Module, adapter: FlexDraftAdapter, kv_pool, req_to_token: Tensor, profile=OFF):
        super().__init__()
        self.profile = profile  # the worker's step profile: times the pass's parts
        cfg = adapter.config
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.block_size, self.split = cfg.block_size, cfg.split_layer
        self.model, self.kv_pool, self.req_to_token = model, kv_pool, req_to_token
        layers = model.model.layers
        self.deep_layers = [layers[i] for i in range(self.split, cfg.target.num_layers)]
        self.projectors = nn.ModuleList(
            TunedProjectors(layer.self_attn, tuned, self.dtype, self.device)
            for layer, tuned in zip(self.deep_layers, adapter.attention)
        )
        self.mask_embedding = adapter.mask_embedding.detach().to(self.device, self.dtype)
        self.calibration = adapter.calibration.to(self.device, self.dtype)
        self.head = self._draft_head(model, adapter)
        self._flashinfer: FlashInferMaskAttention | None = None  # created at the first GPU step

    def _plan_attention(self, qo_indptr: Tensor, kv_indptr: Tensor, kv_indices: Tensor):
        """FlashInfer's plan for this step's blocks on a GPU (None on CPU: `attend` runs PyTorch there)."""
        if not (self.device.type == "cuda" and flashinfer_available()):
            return None
        if self._flashinfer is None:
            self._flashinfer = FlashInferMaskAttention(self.device, workspace=_sglang_workspace(self.device))
        attn = self.deep_layers[0].self_attn
        pool_dtype = self.kv_pool.get_key_buffer(attn.attn.layer_id).dtype
        self._flashinfer.plan(qo_indptr, kv_indptr, kv_indices, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                              None, attn.scaling, q_dtype=self.dtype, kv_dtype=pool_dtype)
        return self._flashinfer

    @torch.no_grad()
    def calibrated_drafts(self, req_pool_indices: Tensor, committed_lens: Tensor, bonus: Tensor,
                          temperatures: Tensor | None) -> CalibratedDrafts:
        """The calibrated drafts [bs, B-1] of the block anchored after each request's last committed token; row 0
        sits at the bonus's slot (position committed_len) and is calibrated away, rows 1..B-1 draft the tokens after
        the bonus. `temperatures` [bs, 1] (None when all greedy) adds the sampling distribution."""
        bs, B = len(committed_lens), self.block_size
        lens = committed_lens.to(torch.long)
        positions = (lens[:, None] + torch.arange(B, device=lens.device)).reshape(-1)
        # The block's attention: all committed K/V of its request (paged prefix, no mask) plus its own B rows
        # (bidirectional), through FlashInfer on a GPU (planned once, shared by the N layers), PyTorch otherwise.
        prof = self.profile
        with prof.section("gather_kv"):
            qo_indptr = torch.arange(bs + 1, device=lens.device) * B
            kv_indptr = torch.cat([lens.new_zeros(1), torch.cumsum(lens, 0)])
            with prof.section("host_sync"):
                longest = int(lens.max())
            slots = torch.arange(longest, device=lens.device)
            committed = self.req_to_token[req_pool_indices.long()[:, None], slots[None, :]]
            kv_indices = committed[slots[None, :] < lens[:, None]].long()
            planned = self._plan_attention(qo_indptr, kv_indptr, kv_indices)

        with prof.section("layers"):
            x = self.mask_embedding.repeat(bs, 1)  # [bs * B, H]: row j of every block gets embedding j
            for layer, tuned in zip(self.deep_layers, self.projectors):
                attn = layer.self_attn
                h = layer.input_layernorm(x)
                q, k, v = tuned.qkv(h)
                q, k = attn.rotary_emb(positions, q, k)
                hd, layer_id = attn.head_dim, attn.attn.layer_id
                out = attend(q.view(bs * B, -1, hd), k.view(bs * B, -1, hd), v.view(bs * B, -1, hd), qo_indptr,
                             self.kv_pool.get_key_buffer(layer_id), self.kv_pool.get_value_buffer(layer_id),
                             kv_indptr, kv_indices, None, attn.scaling, planned)
                o, _ = tuned.o_proj(out.reshape(bs * B, -1))
                x = x + o
                x = x + mlp_output(layer.mlp, layer.post_attention_layernorm(x))

        hidden = self.model.model.norm(x).view(bs, B, -1)[:, 1:]
        bonus_embedding = self.model.model.embed_tokens(bonus)[:, None].expand_as(hidden)
        return calibrated_drafts(self.calibration, bonus_embedding, hidden, self.head, temperatures)

    @staticmethod
    def _draft_head(model: nn.Module, adapter: FlexDraftAdapter):
        """The LM head drafts read (`DraftHead`): over the adapter's draft vocabulary alone if it has one. Under
        tensor parallelism each rank holds a slice of the (padded) vocabulary: a draft vocabulary's rows are gathered
        once, the whole head's logits at every call."""
        weight, linear = model.lm_head.weight, cpu_linear  # F.linear, by the fastest routine on a CPU
        if tp_size() > 1:
            from sglang.srt.distributed import tensor_model_parallel_all_gather

            if adapter.draft_vocab is not None:
                weight = tensor_model_parallel_all_gather(weight.contiguous(), dim=0)
            else:
                def linear(h: Tensor, w: Tensor) -> Tensor:
                    return tensor_model_parallel_all_gather(cpu_linear(h, w).contiguous(), dim=-1)
        return adapter.draft_head(weight, linear=linear)
