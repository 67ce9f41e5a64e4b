"""The LLaMA transformer with the LLaMA-Adapter V2 additions, in one file.

Plain Llama-family models (Meta LLaMA, SmolLM2: grouped-query attention, rope_theta, tied embeddings) and
LLaMA-Adapter V2 checkpoints run through the same code. The V2 additions, inline behind config flags:

- biases on wq, wo, w1, w2, w3; LoRA on all seven projections (rank from the checkpoint, no scaling);
- adaption prompts in the adapted layers: prompt K/V come from the *plain* wk/wv (no bias, no LoRA, no
  RoPE), get their own softmax, are scaled by tanh(gate) per head (and the scalar new_gate) and added to
  the attention output before wo.

Adapter tensors are banks with a leading adapter dimension; each batch row selects its adapter through
`adapter_ids`, so requests for different adapters share one forward pass over the frozen base.

Per-request state lives outside the module: the caller passes positions, the KV cache and the cache slot
of each row, and the precomputed prompt K/V (see `prompt_kv`). Shapes: B batch rows, T new tokens, L keys,
H heads, K kv heads, D head dim, P prompt tokens, A adapters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelArgs


@dataclass(frozen=True)
class KVCache:
    """Per-layer key/value storage indexed by slot: k, v of shape (n_layers, S, K, max_len, D)."""

    k: Tensor
    v: Tensor

    @staticmethod
    def allocate(args: ModelArgs, n_slots: int, max_len: int, dtype: torch.dtype, device=None) -> KVCache:
        shape = (args.n_layers, n_slots, args.kv_heads, max_len, args.head_dim)
        return KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def n_slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


@dataclass(frozen=True)
class PromptKV:
    """Adaption-prompt keys/values for the adapted layers: k, v of shape (n_adapted, B, K, P, D).

    `mask` (B, P) marks valid prompt tokens when rows carry different numbers of prompts (None: all valid).
    """

    k: Tensor
    v: Tensor
    mask: Tensor | None = None


class RMSNorm(nn.Module):
    """RMSNorm whose weight is a bank (A or 1 rows): each batch row uses its adapter's norm weight."""

    def __init__(self, dim: int, eps: float, n_banks: int = 1):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_banks, dim))

    def forward(self, x: Tensor, adapter_ids: Tensor | None) -> Tensor:
        # normalise in fp32, cast back to the input dtype, then scale (the reference's order)
        xf = x.float()
        normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        w = self.weight[0] if adapter_ids is None else self.weight[adapter_ids][:, None, :]  # (dim) | (B,1,dim)
        return normed * w


def rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Rotary embedding in the interleaved-pair (Meta) layout. x: (B, T, H, D); positions: (B, T)."""
    D = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, device=x.device)[: D // 2].float() / D))  # (D/2)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    cos, sin = torch.cos(angles)[:, :, None, :], torch.sin(angles)[:, :, None, :]  # (B, T, 1, D/2)
    xf = x.float().unflatten(-1, (D // 2, 2))  # (B, T, H, D/2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


def linear(x: Tensor, weight: Tensor, packed: Tensor | None) -> Tensor:
    """F.linear, or oneDNN's linear over a weight prepacked by `pack_weight` (CPU: 1.5-5x faster GEMV)."""
    if packed is None:
        return F.linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [None], "")


def pack_weight(weight: Tensor) -> Tensor | None:
    """The oneDNN blocked layout of a CPU fp32/bf16 weight (a copy), or None where that path is unavailable."""
    ok = weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
    if not (ok and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


class AdapterLinear(nn.Module):
    """nn.Linear (no bias) over the frozen base weight, plus optional per-adapter bias and LoRA banks."""

    def __init__(self, d_in: int, d_out: int, args: ModelArgs, bias: bool):
        super().__init__()
        A, r = args.n_adapters, args.lora_rank
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(A, d_out)) if bias and args.w_bias and A else None
        lora = args.w_lora and A > 0
        self.lora_l1 = nn.Parameter(torch.zeros(A, r, d_in)) if lora else None  # (A, r, in)
        self.lora_l2 = nn.Parameter(torch.zeros(A, d_out, r)) if lora else None  # (A, out, r)
        self.packed: Tensor | None = None  # prepacked copy of `weight` (see Transformer.pack_weights)

    def base(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.packed)

    def forward(self, x: Tensor, adapter_ids: Tensor | None) -> Tensor:
        y = linear(x, self.weight, self.packed)  # (B, T, out)
        if adapter_ids is None:
            return y
        if self.bias is not None:
            y = y + self.bias[adapter_ids][:, None, :]
        if self.lora_l1 is not None:
            low = torch.bmm(x, self.lora_l1[adapter_ids].transpose(1, 2))  # (B, T, r)
            y = y + torch.bmm(low, self.lora_l2[adapter_ids].transpose(1, 2))  # (B, T, out)
        return y

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold the (single) adapter's LoRA into the weight: W' = W + l2 @ l1. Exact up to rounding."""
        if self.lora_l1 is None:
            return
        assert self.lora_l1.shape[0] == 1, "merging LoRA needs exactly one adapter on this base"
        delta = self.lora_l2[0].float() @ self.lora_l1[0].float()
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        self.lora_l1, self.lora_l2 = None, None
        self.packed = None if self.packed is None else pack_weight(self.weight)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        H, K, D, A = args.n_heads, args.kv_heads, args.head_dim, args.n_adapters
        self.wq = AdapterLinear(args.dim, H * D, args, bias=True)
        self.wk = AdapterLinear(args.dim, K * D, args, bias=False)
        self.wv = AdapterLinear(args.dim, K * D, args, bias=False)
        self.wo = AdapterLinear(H * D, args.dim, args, bias=True)
        prompts = args.query_len > 0 and A > 0
        self.gate = nn.Parameter(torch.zeros(A, H)) if prompts else None  # applied as tanh(gate)
        self.new_gate = nn.Parameter(torch.ones(A)) if prompts and args.w_new_gate else None

    def forward(
        self,
        x: Tensor,  # (B, T, dim)
        positions: Tensor,  # (B, T)
        adapter_ids: Tensor | None,
        cache: tuple[Tensor, Tensor] | None,  # this layer's (k, v): (S, K, max_len, D)
        slots: Tensor | None,  # (B,)
        prompt_kv: tuple[Tensor, Tensor, Tensor | None] | None,  # (B, K, P, D) x2, mask (B, P)
    ) -> Tensor:
        a = self.args
        B, T, _ = x.shape
        H, K, D = a.n_heads, a.kv_heads, a.head_dim
        q = self.wq(x, adapter_ids).view(B, T, H, D)
        k = self.wk(x, adapter_ids).view(B, T, K, D)
        v = self.wv(x, adapter_ids).view(B, T, K, D)
        q, k = rope(q, positions, a.rope_theta), rope(k, positions, a.rope_theta)

        if cache is None:
            keys, values, key_pos = k.transpose(1, 2), v.transpose(1, 2), positions  # (B, K, T, D)
        else:
            cache_k, cache_v = cache
            cache_k[slots[:, None], :, positions] = k  # advanced indices first: (B, T, K, D)
            cache_v[slots[:, None], :, positions] = v
            L = int(positions.max()) + 1
            keys, values = cache_k[slots, :, :L], cache_v[slots, :, :L]  # (B, K, L, D)
            key_pos = torch.arange(L, device=x.device).expand(B, L)
        # causal by position: query at p sees keys at positions <= p (stale cache entries are masked)
        mask = key_pos[:, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, L)
        q = q.transpose(1, 2)  # (B, H, T, D)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=K != H)  # (B,H,T,D)

        if prompt_kv is not None and self.gate is not None:
            pk, pv, pmask = prompt_kv
            if K != H:
                pk, pv = pk.repeat_interleave(H // K, dim=1), pv.repeat_interleave(H // K, dim=1)
            scores = (q @ pk.transpose(2, 3)) / D**0.5  # (B, H, T, P)
            if pmask is not None:
                scores = scores.masked_fill(~pmask[:, None, None, :], float("-inf"))
            weights = F.softmax(scores.float(), dim=-1).type_as(q)
            gate = torch.tanh(self.gate[adapter_ids]).to(q.dtype)[:, :, None, None]  # (B, H, 1, 1)
            if self.new_gate is not None:
                gate = gate * self.new_gate[adapter_ids].to(q.dtype)[:, None, None, None]
            out = out + (gate * weights) @ pv

        out = out.transpose(1, 2).reshape(B, T, H * D)
        return self.wo(out, adapter_ids)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hidden = args.ffn_hidden
        self.w1 = AdapterLinear(args.dim, hidden, args, bias=True)
        self.w2 = AdapterLinear(hidden, args.dim, args, bias=True)
        self.w3 = AdapterLinear(args.dim, hidden, args, bias=True)

    def forward(self, x: Tensor, adapter_ids: Tensor | None) -> Tensor:
        return self.w2(F.silu(self.w1(x, adapter_ids)) * self.w3(x, adapter_ids), adapter_ids)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        banks = max(args.n_adapters, 1)
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, banks)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, banks)

    def forward(self, x, positions, adapter_ids, cache, slots, prompt_kv) -> Tensor:
        h = x + self.attention(self.attention_norm(x, adapter_ids), positions, adapter_ids, cache, slots, prompt_kv)
        return h + self.feed_forward(self.ffn_norm(h, adapter_ids), adapter_ids)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, max(args.n_adapters, 1))
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.output_packed: Tensor | None = None

    def forward(
        self,
        tokens: Tensor,  # (B, T)
        positions: Tensor,  # (B, T) absolute text positions (prompts take none)
        *,
        cache: KVCache | None = None,
        slots: Tensor | None = None,  # (B,) cache slot of each row
        adapter_ids: Tensor | None = None,  # (B,) bank row of each row; None for a plain model
        prompt_kv: PromptKV | None = None,
        last_only: bool = True,
    ) -> Tensor:
        """Logits as float32: (B, vocab) for the last position, or (B, T, vocab) with last_only=False."""
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        adapted = self.args.adapted_layers
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            pkv = None
            if prompt_kv is not None and i in adapted:
                j = i - adapted.start
                pkv = (prompt_kv.k[j], prompt_kv.v[j], prompt_kv.mask)
            h = layer(h, positions, adapter_ids, layer_cache, slots, pkv)
        if last_only:
            h = h[:, -1:, :]
        h = self.norm(h, adapter_ids)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        logits = linear(h, weight, self.output_packed).float()
        return logits[:, -1] if last_only else logits

    def prompt_kv(self, prompts: Tensor) -> tuple[Tensor, Tensor]:
        """Keys/values of adaption prompts through the plain wk/wv of each adapted layer (no RoPE).

        prompts: (n_adapted, B, P, dim) → k, v: (n_adapted, B, K, P, D). A function of the image alone,
        so it is computed once per request rather than at every step as the reference does.
        """
        a = self.args
        ks, vs = [], []
        for j, i in enumerate(a.adapted_layers):
            attn = self.layers[i].attention
            p = prompts[j]
            B, P, _ = p.shape
            ks.append(attn.wk.base(p).view(B, P, a.kv_heads, a.head_dim).transpose(1, 2))
            vs.append(attn.wv.base(p).view(B, P, a.kv_heads, a.head_dim).transpose(1, 2))
        return torch.stack(ks), torch.stack(vs)

    def merge_lora(self) -> None:
        """Fold LoRA into wq, wo, w1, w2, w3. wk/wv keep theirs unmerged: the adaption prompts must go
        through the plain wk/wv weights."""
        for layer in self.layers:
            for linear in (layer.attention.wq, layer.attention.wo, *layer.feed_forward.children()):
                linear.merge_lora()

    @torch.no_grad()
    def pack_weights(self) -> None:
        """CPU inference: keep a oneDNN-prepacked copy of every base weight (more memory, faster GEMV)."""
        for module in self.modules():
            if isinstance(module, AdapterLinear):
                module.packed = pack_weight(module.weight)
        self.output_packed = pack_weight(self.tok_embeddings.weight if self.output is None else self.output.weight)
