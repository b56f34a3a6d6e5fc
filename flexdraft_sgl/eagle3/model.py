"""An EAGLE-3 draft head in plain torch, computing exactly what SGLang 0.5.23's `LlamaForCausalLMEagle3`
(sglang/srt/models/llama_eagle3.py) computes, with the same parameter names as its checkpoints (`checkpoint.py`).

One row of the head reads a token embedding e (the target's, frozen) and a hidden state g, which is either
fc(cat(target features)) of the previous position (`fuse`) or, at later draft steps, the head's own previous output:

    x = cat(input_layernorm(e), hidden_norm(g))          # 2H: the only layer whose q/k/v take 2H
    r = g + o_proj(attention(q_proj x, k_proj x, v_proj x))   (RoPE on q, k; causal over the KV the row may see)
    h = r + mlp(post_attention_layernorm(r))
    logits = lm_head(norm(h))  over the draft vocabulary;  draft id i is target id i + d2t[i]

h (before the final norm) is what SGLang feeds the next draft step (`norm_output` unset). The residual around the
attention is g itself (SGLang: `residual = hidden_states` before `hidden_norm`), not x.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from .checkpoint import captured_layers, eagle3_config, read_eagle3, write_eagle3


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.q_proj = nn.Linear(2 * hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(2 * hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)


class _MidLayer(nn.Module):
    def __init__(self, config, head_dim: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = _Attention(h, config.num_attention_heads, config.num_key_value_heads, head_dim)
        self.mlp = LlamaMLP(config)
        self.input_layernorm, self.hidden_norm, self.post_attention_layernorm = (LlamaRMSNorm(h, eps) for _ in range(3))


class Eagle3Draft(nn.Module):
    """An EAGLE-3 head for a Llama target with this (transformers) config. `aux_layer_ids` as in SGLang's
    eagle_config (None: SGLang's default capture); `captured` are the target layers whose inputs `fuse` reads."""

    def __init__(self, target_config, draft_vocab_size: int, aux_layer_ids: list[int] | None = None):
        super().__init__()
        if target_config.model_type != "llama":
            raise ValueError(f"EAGLE-3 heads here are for Llama targets (SGLang's LlamaForCausalLMEagle3), not "
                             f"{target_config.model_type!r}")
        if getattr(target_config, "attention_bias", False) or getattr(target_config, "mlp_bias", False):
            raise ValueError("SGLang's EAGLE-3 head has no biases; this target's config asks for them")
        c = target_config
        self.target_config, self.aux_layer_ids = c, None if aux_layer_ids is None else list(aux_layer_ids)
        self.captured = captured_layers(c.num_hidden_layers, aux_layer_ids)
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.draft_vocab_size = draft_vocab_size
        self.fc = nn.Linear(len(self.captured) * c.hidden_size, c.hidden_size, bias=False)
        self.midlayer = _MidLayer(c, self.head_dim)
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool))
        self.rotary = LlamaRotaryEmbedding(c)  # the target's RoPE (theta, scaling), as SGLang builds it from config

    # ---- the draft vocabulary ----------------------------------------------------------------------------------
    @property
    def hot(self) -> Tensor:
        """Target id of each draft id (SGLang's hot_token_id = d2t + arange)."""
        return self.d2t + torch.arange(len(self.d2t), device=self.d2t.device)

    def set_vocabulary(self, target_ids: Tensor) -> Eagle3Draft:
        """Draft id i proposes target id target_ids[i]."""
        target_ids = torch.as_tensor(target_ids, dtype=torch.long, device=self.d2t.device)
        if target_ids.shape != self.d2t.shape or target_ids.unique().numel() != len(target_ids):
            raise ValueError(f"need {len(self.d2t)} distinct target ids")
        self.d2t.copy_(target_ids - torch.arange(len(target_ids), device=target_ids.device))
        self.t2d.zero_().index_fill_(0, target_ids, True)
        return self

    # ---- the computation ---------------------------------------------------------------------------------------
    def fuse(self, features: Tensor) -> Tensor:
        """[n, n_aux * H] target features (the captured layers' inputs side by side) -> [n, H] hidden input."""
        return self.fc(features)

    def project(self, embeds: Tensor, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q [heads, n, d], k and v [kv_heads, n, d] of n rows (RoPE applied)."""
        layer, n = self.midlayer, len(embeds)
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], -1)
        attn = layer.self_attn
        q = attn.q_proj(x).view(n, self.heads, self.head_dim).transpose(0, 1)
        k = attn.k_proj(x).view(n, self.kv_heads, self.head_dim).transpose(0, 1)
        v = attn.v_proj(x).view(n, self.kv_heads, self.head_dim).transpose(0, 1)
        cos, sin = self.rotary(x, positions[None])
        q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
        return q[0], k[0], v

    def finish(self, attended: Tensor, hidden: Tensor) -> Tensor:
        """attention output [heads, n, d] and the rows' hidden input -> h [n, H], the pre-norm output."""
        layer = self.midlayer
        r = hidden + layer.self_attn.o_proj(attended.transpose(0, 1).flatten(1))
        return r + layer.mlp(layer.post_attention_layernorm(r))

    def logits(self, h: Tensor) -> Tensor:
        return self.lm_head(self.norm(h))

    def forward(self, embeds: Tensor, hidden: Tensor, positions: Tensor, past: tuple[Tensor, Tensor] | None = None,
                mask: Tensor | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Rows as decoding runs them: their keys/values appended to `past` (a KV cache, [kv_heads, m, d] each),
        `mask` [n, m + n] (True = may attend; default causal over the new rows after all of past). Returns h and the
        grown cache."""
        q, k, v = self.project(embeds, hidden, positions)
        if past is not None:
            k, v = torch.cat([past[0], k], 1), torch.cat([past[1], v], 1)
        if mask is None:
            n, m = q.shape[1], k.shape[1]
            mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
        attended = scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.finish(attended, hidden), (k, v)

    @torch.no_grad()
    def draft_chain(self, embedding: Tensor, features: Tensor, tokens: list[int], steps: int) -> list[int]:
        """SGLang's greedy chain (topk 1) after committed `tokens`, whose target features (`features`, one row per
        token but the last, the bonus token not yet run by the target) are known: the committed rows first (row p
        reads token p + 1 and the features at p, position p), then one row per draft step on the KV cache."""
        n = len(tokens) - 1
        ids = torch.tensor(tokens[1:], device=embedding.device)
        h, cache = self(embedding[ids], self.fuse(features[:n]), torch.arange(n, device=embedding.device))
        hidden, out = h[-1:], []
        for step in range(steps):
            out.append(int(self.hot[self.logits(hidden)[-1].argmax()]))
            if step + 1 < steps:
                position = torch.tensor([n + step], device=embedding.device)
                hidden, cache = self(embedding[out[-1:]], hidden, position, cache)
        return out

    # ---- initialisation and files ------------------------------------------------------------------------------
    @torch.no_grad()
    def randomize(self, seed: int = 0, std: float = 0.02) -> Eagle3Draft:
        """N(0, std) weights, unit norms and a random draft vocabulary, drawn in a fixed order (the checkpoints of
        earlier `save_random_eagle3` calls come out bit for bit)."""
        g = torch.Generator().manual_seed(seed)
        self.set_vocabulary(torch.randperm(self.t2d.numel(), generator=g)[: len(self.d2t)].sort().values)
        attn, mlp = self.midlayer.self_attn, self.midlayer.mlp
        for linear in (self.fc, attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                       mlp.down_proj, self.lm_head):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=g) * std)
        for norm in (self.midlayer.input_layernorm, self.midlayer.hidden_norm,
                     self.midlayer.post_attention_layernorm, self.norm):
            norm.weight.fill_(1.0)
        return self

    def save(self, out_dir, dtype: torch.dtype = torch.float32):
        """Write the SGLang checkpoint (weights in `dtype`; d2t and t2d as they are)."""
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.state_dict().items()}
        return write_eagle3(eagle3_config(self.target_config, self.draft_vocab_size, self.aux_layer_ids),
                            {k: v.cpu() for k, v in weights.items()}, out_dir)

    @classmethod
    def load(cls, folder, target_config, dtype: torch.dtype = torch.float32) -> Eagle3Draft:
        config, weights = read_eagle3(folder)
        aux = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        draft = cls(target_config, config["draft_vocab_size"], aux)
        draft.load_state_dict(weights)
        return draft.to(dtype)
