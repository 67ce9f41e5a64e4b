"""The LLaMA transformer with the LLaMA-Adapter V2 additions, in one file.

Plain Llama-family models (Meta LLaMA, SmolLM2: grouped-query attention, rope_theta, tied embeddings) and
LLaMA-Adapter V2 checkpoints run through the same code. The V2 additions, inline behind config flags:

- biases on wq, wo, w1, w2, w3; LoRA on all seven projections (rank from the checkpoint, no scaling);
- adaption prompts in the adapted layers: prompt K/V come from the *plain* wk/wv (no bias, no LoRA, no
  RoPE), get their own softmax, are scaled by tanh(gate) per head (and the scalar new_gate) and added to
  the attention output before wo.

Adapter tensors are banks with a leading adapter dimension; each batch row selects its adapter through
`adapter_ids`, so requests for different adapters share one forward pass over the frozen base.

Per-request state lives outside the module: the caller passes positions, the KV cache and the cache row
of each batch row, and the precomputed prompt K/V (see `prompt_kv`). Shapes: B batch rows, T new tokens, L keys,
H heads, K kv heads, D head dim, P prompt tokens, A adapters.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import ModelArgs
from models.kernels import quant
from models.kernels.quant import Weight


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device) -> Tensor:
    """Zeros; on the CPU in an anonymous memory map, whose pages the OS commits when first written: a cache
    sized for 16 × 2048 tokens costs memory for the tokens actually held, not for its capacity."""
    if device is not None and torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.frombuffer(mmap.mmap(-1, max(n, 1)), dtype=dtype, count=math.prod(shape)).view(shape)


@dataclass(frozen=True)
class KVCache:
    """Key/value storage in cache rows: k[i], v[i] of shape (S, K, max_len, D) for layer i.

    One tensor per layer (not views of one): a compiled forward then updates each in place, with no
    write-back copy of the whole cache."""

    k: tuple[Tensor, ...]
    v: tuple[Tensor, ...]

    @staticmethod
    def allocate(args: ModelArgs, n_slots: int, max_len: int, dtype: torch.dtype, device=None) -> KVCache:
        shape = (n_slots, args.kv_heads, max_len, args.head_dim)
        k = tuple(_zeros(shape, dtype, device) for _ in range(args.n_layers))
        v = tuple(_zeros(shape, dtype, device) for _ in range(args.n_layers))
        return KVCache(k, v)

    @property
    def n_slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def held_by(self, kernel_module):
        """These tensors as a kernel variant's fused forward holds them (its FusedCache), made once per variant."""
        held = self.__dict__.setdefault("_held", {})  # (not a field: a frozen dataclass keeps its own dict)
        if kernel_module not in held:
            held[kernel_module] = kernel_module.FusedCache(list(self.k), list(self.v))
        return held[kernel_module]


@dataclass(frozen=True)
class PromptKV:
    """Adaption-prompt keys/values for the adapted layers: k, v of shape (n_adapted, B, K, P, D).

    `mask` (B, P) marks valid prompt tokens when rows carry different numbers of prompts (None: all valid).
    Or, without copying per batch row: k, v (n_adapted, S, K, P, D) for S prompt rows, of which batch row b
    reads row `rows[b]`, its first `lengths[b]` prompts valid (see `gathered`).
    """

    k: Tensor
    v: Tensor
    mask: Tensor | None = None
    rows: Tensor | None = None  # (B,) long
    lengths: Tensor | None = None  # (B,) long, with `rows`

    def gathered(self) -> PromptKV:
        """The (n_adapted, B, K, P, D) + mask form (a copy per batch row)."""
        if self.rows is None:
            return self
        P = int(self.lengths.max())
        k, v = self.k[:, self.rows, :, :P], self.v[:, self.rows, :, :P]
        mask = None
        if int(self.lengths.min()) != P:
            mask = torch.arange(P, device=self.k.device)[None, :] < self.lengths[:, None]
        return PromptKV(k, v, mask)

    def by_row(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(k, v, rows, lengths) of the by-row form."""
        if self.rows is not None:
            return self.k, self.v, self.rows, self.lengths
        B, P = self.k.shape[1], self.k.shape[3]
        lengths = torch.full((B,), P) if self.mask is None else self.mask.sum(-1)
        return self.k, self.v, torch.arange(B), lengths


class RMSNorm(nn.Module):
    """RMSNorm whose weight is a bank (A or 1 rows): each batch row uses its adapter's norm weight."""

    def __init__(self, dim: int, eps: float, n_banks: int = 1):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(n_banks, dim))

    def forward(self, x: Tensor, adapter_ids: Tensor | None) -> Tensor:
        # normalise in fp32, cast back to the input dtype, then scale (the reference's order); rms_norm
        # accumulates in fp32 for bf16/fp16 inputs, so no upcast copy is needed
        normed = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        w = self.weight[0] if adapter_ids is None else self.weight[adapter_ids][:, None, :]  # (dim) | (B,1,dim)
        return normed * w


def rotations(positions: Tensor, head_dim: int, theta: float) -> Tensor:
    """RoPE rotations e^(i·pos·freq) as complex64 (B, T, 1, D/2): computed once per forward, shared by all layers."""
    D = head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, D, 2, device=positions.device)[: D // 2].float() / D))  # (D/2)
    angles = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    return torch.polar(torch.ones_like(angles), angles)[:, :, None, :]


def rope(x: Tensor, rot: Tensor) -> Tensor:
    """Rotary embedding in the interleaved-pair (Meta) layout: pairs (x0, x1) are complex numbers rotated by
    `rot`. x: (B, T, H, D) (any H: q and k heads may be roped together); rot: (B, T, 1, D/2)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, D/2)
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)


def linear(x: Tensor, weight: Tensor | None, packed: Weight | None) -> Tensor:
    """x @ W.T through the weight's packed form (models/kernels: integer or bf16 kernels) when it has one,
    else F.linear on the plain weight. A linear layer holds one of the two, never both."""
    return F.linear(x, weight) if packed is None else packed.matmul(x)


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
        self.packed: Weight | None = None  # the weight in a kernel's layout; `weight` is then None

    def base(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.packed)

    def forward(self, x: Tensor, adapter_ids: Tensor | None) -> Tensor:
        return self.adapt(x, linear(x, self.weight, self.packed), adapter_ids)

    def adapt(self, x: Tensor, y: Tensor, adapter_ids: Tensor | None) -> Tensor:
        """Adds the per-adapter bias and LoRA to the base output y (B, T, out) of x (B, T, in)."""
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
        if self.weight is None:
            raise RuntimeError("merge LoRA before the weights are packed or quantized")
        assert self.lora_l1.shape[0] == 1, "merging LoRA needs exactly one adapter on this base"
        delta = self.lora_l2[0].float() @ self.lora_l1[0].float()
        self.weight.copy_((self.weight.float() + delta).to(self.weight.dtype))
        self.lora_l1, self.lora_l2 = None, None


@dataclass(frozen=True)
class ForwardState:
    """What every layer of one forward shares, computed once per forward (not once per layer)."""

    rot: Tensor  # (B, T, 1, D/2) RoPE rotations (see `rotations`)
    mask: Tensor | None  # (B, 1, T, L) additive attention mask (0 or -inf); None: every key is visible
    rows: Tensor | slice | None  # cache rows of the batch: a slice when contiguous (views, no gather copy)
    writes: Tensor | None  # (B·T·K,) where each new key/value row goes in a layer's cache viewed as (S·K·max_len, D)
    L: int  # keys attended: positions 0..L-1 of each row


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
        self.wqkv_packed: Weight | None = None  # [wq; wk; wv] packed as one: one product instead of three

    def forward(
        self,
        x: Tensor,  # (B, T, dim)
        state: ForwardState,
        adapter_ids: Tensor | None,
        cache: tuple[Tensor, Tensor] | None,  # this layer's (k, v): (S, K, max_len, D)
        prompt_kv: tuple[Tensor, Tensor, Tensor | None] | None,  # (B, K, P, D) x2, mask (B, P)
    ) -> Tensor:
        a = self.args
        B, T, _ = x.shape
        H, K, D = a.n_heads, a.kv_heads, a.head_dim
        if self.wqkv_packed is not None:
            qkv = linear(x, None, self.wqkv_packed)  # (B, T, (H + 2K) D)
            q, k, v = qkv.split([H * D, K * D, K * D], dim=-1)
            if adapter_ids is None:  # rope q and k heads in one go
                qk = rope(qkv[..., : (H + K) * D].view(B, T, H + K, D), state.rot)  # (B, T, H + K, D)
                q, k = qk[:, :, :H], qk[:, :, H:]
            else:
                q = rope(self.wq.adapt(x, q, adapter_ids).view(B, T, H, D), state.rot)
                k = rope(self.wk.adapt(x, k, adapter_ids).view(B, T, K, D), state.rot)
                v = self.wv.adapt(x, v, adapter_ids)
        else:
            q = rope(self.wq(x, adapter_ids).view(B, T, H, D), state.rot)
            k = rope(self.wk(x, adapter_ids).view(B, T, K, D), state.rot)
            v = self.wv(x, adapter_ids)
        v = v.view(B, T, K, D)

        if cache is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, T, D)
        else:
            cache_k, cache_v = cache
            # rows in (B, T, K) order; the cache may be held in a narrower dtype than the activations
            cache_k.view(-1, D).index_copy_(0, state.writes, k.reshape(-1, D).to(cache_k.dtype))
            cache_v.view(-1, D).index_copy_(0, state.writes, v.reshape(-1, D).to(cache_v.dtype))
            keys, values = cache_k[state.rows, :, : state.L], cache_v[state.rows, :, : state.L]  # (B, K, L, D)
        q = q.transpose(1, 2)  # (B, H, T, D)
        if T == 1 and prompt_kv is None:  # decode: plain batched matmuls (in fp32) beat SDPA's CPU kernels
            G = H // K  # query heads per kv head (head h reads kv head h // G)
            scores = (q.reshape(B, K, G, D).float() * D**-0.5) @ keys.float().transpose(2, 3)  # (B, K, G, L)
            if state.mask is not None:
                scores = scores + state.mask  # (B, 1, 1, L)
            out = (F.softmax(scores, dim=-1) @ values.float()).type_as(q).view(B, H, 1, D)  # (B, H, 1, D)
        else:
            keys, values = keys.to(q.dtype), values.to(q.dtype)  # no copy when the cache is in q's dtype
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=state.mask, enable_gqa=K != H)  # (B,H,T,D)

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
        self.w13_packed: Weight | None = None  # [w1; w3] packed as one: one product instead of two

    def forward(self, x: Tensor, adapter_ids: Tensor | None) -> Tensor:
        if self.w13_packed is not None:
            gate, up = linear(x, None, self.w13_packed).chunk(2, dim=-1)  # (B, T, hidden) x2
            gate, up = self.w1.adapt(x, gate, adapter_ids), self.w3.adapt(x, up, adapter_ids)
        else:
            gate, up = self.w1(x, adapter_ids), self.w3(x, adapter_ids)
        return self.w2(F.silu(gate) * up, adapter_ids)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        banks = max(args.n_adapters, 1)
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, banks)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, banks)

    def forward(self, x, state, adapter_ids, cache, prompt_kv) -> Tensor:
        h = x + self.attention(self.attention_norm(x, adapter_ids), state, adapter_ids, cache, prompt_kv)
        return h + self.feed_forward(self.ffn_norm(h, adapter_ids), adapter_ids)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, max(args.n_adapters, 1))
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.embed_packed: Weight | None = None  # packed token embeddings (rows dequantized on lookup)
        self.output_packed: Weight | None = None  # packed output projection (the embeddings when tied)
        self.fused = None  # (embeddings packed?, its FusedModel, vocab padded?, kernel module): `prepare_fused`

    def forward(
        self,
        tokens: Tensor,  # (B, T)
        positions: Tensor,  # (B, T) absolute text positions (prompts take none)
        *,
        cache: KVCache | None = None,
        rows: Tensor | None = None,  # (B,) the cache row each batch row reads and writes
        adapter_ids: Tensor | None = None,  # (B,) bank row of each row; None for a plain model
        prompt_kv: PromptKV | None = None,
        last_only: bool = True,
        logit_index: Tensor | None = None,  # (M,) flat indices into the B·T positions whose logits are wanted
        pad: Tensor | None = None,  # (B, T) bool: padding, whose K/V go to `scratch_row` (never read)
        scratch_row: int | None = None,
    ) -> Tensor:
        """Logits as float32: (B, vocab) for the last position, (B, T, vocab) with last_only=False, or (M, vocab)
        at `logit_index`."""
        if self.fused is not None and cache is not None and pad is None:
            return self._forward_fused(tokens, positions, cache, rows, last_only, logit_index, adapter_ids, prompt_kv)
        if prompt_kv is not None:
            prompt_kv = prompt_kv.gathered()
        state = self.forward_state(positions, cache, rows, self.dtype, pad, scratch_row)
        return self.run(tokens, state, cache=cache, adapter_ids=adapter_ids, prompt_kv=prompt_kv, last_only=last_only,
                        logit_index=logit_index)

    def run(
        self,
        tokens: Tensor,  # (B, T)
        state: ForwardState,
        *,
        cache: KVCache | None = None,
        adapter_ids: Tensor | None = None,
        prompt_kv: PromptKV | None = None,
        last_only: bool = True,
        logit_index: Tensor | None = None,
    ) -> Tensor:
        """`forward` after the per-forward state: no host syncs, fixed shapes for a given `state` (compilable)."""
        h = self.embed(tokens)  # (B, T, dim)
        adapted = self.args.adapted_layers
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else (cache.k[i], cache.v[i])
            pkv = None
            if prompt_kv is not None and i in adapted:
                j = i - adapted.start
                pkv = (prompt_kv.k[j], prompt_kv.v[j], prompt_kv.mask)
            h = layer(h, state, adapter_ids, layer_cache, pkv)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        if logit_index is not None:
            B, T = tokens.shape
            ids = None if adapter_ids is None else adapter_ids.repeat_interleave(T)[logit_index]
            h = self.norm(h.reshape(B * T, 1, -1)[logit_index], ids)  # (M, 1, dim)
            return linear(h, weight, self.output_packed).float()[:, 0]
        if last_only:
            h = h[:, -1:, :]
        h = self.norm(h, adapter_ids)
        logits = linear(h, weight, self.output_packed).float()  # packed: `weight` is None
        return logits[:, -1] if last_only else logits

    def _forward_fused(self, tokens, positions, cache: KVCache, rows, last_only: bool, logit_index,
                       adapter_ids: Tensor | None, prompt_kv: PromptKV | None) -> Tensor:
        """`forward` through the fused CPU kernel (see `forward_fused`): same result as `run` up to fp32 rounding,
        and the same bits for a token however it is batched, chunked or cached."""
        B, T = tokens.shape
        if logit_index is None:
            index = list(range(B * T)) if not last_only else list(range(T - 1, B * T, T))
        else:
            index = logit_index.tolist()
        logits = self.forward_fused(cache, tokens.reshape(-1).tolist(), rows.tolist(), positions.reshape(-1).tolist(),
                                    index, None if adapter_ids is None else adapter_ids.tolist(), prompt_kv)
        if logit_index is None and not last_only:
            return logits.view(B, T, -1)
        return logits

    def forward_fused(self, cache: KVCache, tokens: list[int], rows: list[int], positions: list[int],
                      logit_index: list[int], adapter_ids: list[int] | None = None,
                      prompt_kv: PromptKV | None = None) -> Tensor:
        """Token ids to logits (M, vocab) in one call of the fused CPU kernel (see `prepare_fused`), from plain
        lists: the B = len(rows) batch rows' tokens and positions row by row (T = len(tokens) / B each), each
        row's cache row and adapter, and the M flat token indices whose logits are returned. The engine's step
        calls this directly: after the kernel has streamed the weights through the caches, each torch call on
        the way costs tens of microseconds in misses (the Python side of a batch-1 step took 0.5 ms cold,
        0.05 ms warm), so this one makes no tensors."""
        packed_embeddings, fused, padded_vocab, module = self.fused
        h = None
        if not packed_embeddings:
            with torch.no_grad():
                h = self.embed(torch.tensor(tokens)[None])[0].float()
        pk = pv = None
        prows = plens = []
        if prompt_kv is not None:
            pk, pv, r, n = prompt_kv.by_row()
            prows, plens = r.tolist(), n.tolist()
        logits = fused.forward(cache.held_by(module), tokens, h, rows, positions, logit_index, adapter_ids or [], pk, pv,
                               prows, plens)
        return logits[:, : self.args.vocab_size] if padded_vocab else logits

    def prepare_fused(self) -> bool:
        """Uses the fused forward for this model when it can run it: on the CPU, a compiled kernel variant, the
        output head and every layer's [q;k;v], wo, [w1;w3], w2 packed (quantized, or bf16 where the variant has
        the bf16 product) with whole 16s of rows; plain models and LLaMA-Adapter V2 ones (per-adapter norms,
        biases, LoRA, gated adaption prompts). It computes in fp32 whatever `--dtype` says: over bf16 weights
        the activations are rounded to bf16 for each product only (the eager bf16 layers round every op).
        Returns whether it does. `fused = None` turns it off (the eager path, e.g. in tests)."""
        from models import kernels

        self.fused = None
        out = self.output_packed
        if self.dtype not in (torch.float32, torch.bfloat16) or kernels.isa() == "torch" \
                or self.norm.weight.device.type != "cpu":
            return False
        bf16 = kernels.has_bf16()

        def fusable(w, head: bool = False) -> bool:  # the head's padding rows are sliced off the logits
            return (isinstance(w, quant.QuantWeight) or (bf16 and isinstance(w, quant.Bf16Weight))) and (
                head or w.n % 16 == 0)

        def parts(w) -> tuple[list[Tensor], list[int]]:
            if isinstance(w, quant.Bf16Weight):
                return [w.packed, none, none], [16, 0, 0, 0]
            return [w.qs, w.scales, w.mins if w.mins is not None else none], [w.bits, w.group, w.zero, int(w.big)]

        def norm(weight: Tensor) -> Tensor:  # fp32 (a copy of a bf16 model's: dim values)
            return weight[0].float().contiguous()

        if not fusable(out, head=True):
            return False
        emb = self.embed_packed if fusable(self.embed_packed, head=True) else None
        none = torch.empty(0)
        weights, meta = parts(emb) if emb is not None else ([none, none, none], [0, 0, 0, 0])
        w, m = parts(out)
        weights += [norm(self.norm.weight), *w]
        meta += m
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            mats = (attn.wqkv_packed, attn.wo.packed, ffn.w13_packed, ffn.w2.packed)
            if not all(fusable(w) for w in mats):
                return False
            for rms, w in ((layer.attention_norm, mats[0]), (None, mats[1]), (layer.ffn_norm, mats[2]), (None, mats[3])):
                if rms is not None:
                    weights.append(norm(rms.weight))
                w, m = parts(w)
                weights += w
                meta += m
        a = self.args
        module = kernels.classes()
        fused = module.FusedModel(weights, meta, a.n_heads, a.kv_heads, a.norm_eps, a.rope_theta,
                                  self._fused_adapter_tensors(),
                                  a.adapted_layers.start if len(a.adapted_layers) else a.n_layers)
        # the kernel's output rows come in whole 16s: whether the vocabulary is padded
        self.fused = (emb is not None, fused, out.n % 16 != 0, module)
        return True

    def _fused_adapter_tensors(self) -> list[Tensor]:
        """The adapter pieces in the fused kernel's order (see forward_plain in models/kernels/qmatmul.cpp):
        the parameters themselves (no copies) but the concatenated [q;k;v] and [w1;w3] biases and the gates'
        tanh(gate)·new_gate, which are small."""
        if not self.args.n_adapters:
            return []
        none = torch.empty(0)
        A = self.args.n_adapters

        def t(x: Tensor | None) -> Tensor:
            return none if x is None else x.detach().float().contiguous()

        def lora(x: Tensor | None) -> Tensor:  # read in place: fp32, or a bf16 model's own bf16
            return t(x) if x is None or x.dtype not in (torch.float32, torch.bfloat16) else x.detach().contiguous()

        out = [t(self.norm.weight)]
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            qkv_bias = none
            if attn.wq.bias is not None:
                kv = torch.zeros(A, 2 * self.args.kv_heads * self.args.head_dim)
                qkv_bias = torch.cat([attn.wq.bias.detach().float(), kv], 1)
            w13_bias = none
            if ffn.w1.bias is not None:
                w13_bias = torch.cat([ffn.w1.bias.detach().float(), ffn.w3.bias.detach().float()], 1)
            gate = none
            if attn.gate is not None:
                gate = torch.tanh(attn.gate.detach().float())
                if attn.new_gate is not None:
                    gate = gate * attn.new_gate.detach().float()[:, None]
                gate = gate.contiguous()
            out += [t(layer.attention_norm.weight), t(layer.ffn_norm.weight), qkv_bias, t(attn.wo.bias), w13_bias,
                    t(ffn.w2.bias), gate]
            for lin in (attn.wq, attn.wk, attn.wv, attn.wo, ffn.w1, ffn.w3, ffn.w2):
                out += [lora(lin.lora_l1), lora(lin.lora_l2)]
        return out

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype (the model's `--dtype`): what the norms are held in."""
        return self.norm.weight.dtype

    def embed(self, tokens: Tensor) -> Tensor:
        if self.embed_packed is None:
            return self.tok_embeddings(tokens)
        return self.embed_packed.rows(tokens).to(self.dtype)

    def forward_state(self, positions: Tensor, cache: KVCache | None, rows: Tensor | None, dtype: torch.dtype,
                      pad: Tensor | None = None, scratch_row: int | None = None) -> ForwardState:
        """The per-forward state shared by the layers: RoPE rotations, the causal mask, the cache rows and where
        the new K/V rows go (padding's to `scratch_row`, a cache row nobody reads)."""
        a = self.args
        B, T = positions.shape
        rot = rotations(positions, a.head_dim, a.rope_theta)
        if cache is None:
            key_pos, read, writes, L = positions, None, None, T
        else:
            pos = positions.tolist()
            L = max(map(max, pos)) + 1
            key_pos = torch.arange(L, device=positions.device).expand(B, L)
            first = sl[0] if (sl := rows.tolist()) else 0
            read = slice(first, first + B) if sl == list(range(first, first + B)) else rows
            heads = torch.arange(a.kv_heads, device=positions.device)
            dest = rows[:, None].expand(B, T)
            if pad is not None:
                dest = dest.masked_fill(pad, scratch_row)
            writes = ((dest[:, :, None] * a.kv_heads + heads) * cache.max_len + positions[:, :, None]).flatten()
            if T == 1 and all(p[0] == L - 1 for p in pos):  # decode, all rows at the last key
                return ForwardState(rot, None, read, writes, L)
        # causal by position: query at p sees keys at positions <= p (stale cache entries are masked)
        visible = key_pos[:, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, L)
        mask = torch.zeros(visible.shape, dtype=dtype, device=positions.device).masked_fill_(~visible, float("-inf"))
        return ForwardState(rot, mask, read, writes, L)

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
            if attn.wqkv_packed is not None:
                _, k, v = linear(p, None, attn.wqkv_packed).split([a.n_heads * a.head_dim, *[a.kv_heads * a.head_dim] * 2], -1)
            else:
                k, v = attn.wk.base(p), attn.wv.base(p)
            ks.append(k.reshape(B, P, a.kv_heads, a.head_dim).transpose(1, 2))
            vs.append(v.reshape(B, P, a.kv_heads, a.head_dim).transpose(1, 2))
        return torch.stack(ks), torch.stack(vs)

    def merge_lora(self) -> None:
        """Fold LoRA into wq, wo, w1, w2, w3. wk/wv keep theirs unmerged: the adaption prompts must go
        through the plain wk/wv weights. Before `pack_weights`."""
        for layer in self.layers:
            for lin in (layer.attention.wq, layer.attention.wo, *layer.feed_forward.children()):
                lin.merge_lora()

    def linears(self):
        """(module, name) of every base weight matrix: the seven per layer, the embeddings and the output."""
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            yield from ((attn.wq, "wq"), (attn.wk, "wk"), (attn.wv, "wv"), (attn.wo, "wo"))
            yield from ((ffn.w1, "w1"), (ffn.w2, "w2"), (ffn.w3, "w3"))
        yield self.tok_embeddings, "embed"
        if self.output is not None:
            yield self.output, "output"

    @torch.no_grad()
    def pack_weights(self, quantization: str = "none") -> None:
        """Every base weight ends in the one layout inference reads, and only there.

        A weight already packed (a quantized GGUF tensor, see models/loading.py) stays as it is. A plain one is
        quantized (`quantization` int8 | int4), or packed for the bf16 kernel (bf16 weights on CPUs with
        AVX512-BF16), or stays a plain tensor for F.linear (fp32, fp16, CUDA). Then [wq; wk; wv] and [w1; w3]
        are fused into one packed weight each where their formats agree."""
        for module, _ in self.linears():
            w = module.weight
            if w is None or w.device.type != "cpu":
                continue
            if quantization in ("int8", "int4") and w.shape[1] % 32 == 0:
                packed = quant.quantize(w, quantization)
            elif w.dtype == torch.bfloat16 and quant.kernels.has_bf16() and w.shape[1] % 2 == 0:
                packed = quant.pack_bf16(w)
            else:
                continue
            self.set_packed(module, packed)
        for layer in self.layers:
            attn, ffn = layer.attention, layer.feed_forward
            for owner, name, parts in ((attn, "wqkv_packed", (attn.wq, attn.wk, attn.wv)),
                                       (ffn, "w13_packed", (ffn.w1, ffn.w3))):
                fused = quant.cat([p.packed for p in parts]) if all(p.packed is not None for p in parts) else None
                if fused is not None:
                    setattr(owner, name, fused)
                    for p in parts:
                        p.packed = None
        self.prepare_fused()

    def set_packed(self, module: nn.Module, packed: Weight) -> None:
        """Hands a base weight to its packed form and drops the plain one (it is held once)."""
        module.weight = None
        if module is self.tok_embeddings:
            self.embed_packed = packed
            if self.output is None:
                self.output_packed = packed  # tied: the same packed tensor serves both
        elif module is self.output:
            self.output_packed = packed
        else:
            module.packed = packed

    def held_weights(self):
        """Every base weight as held — plain tensors and packed weights — each once (a tied one once)."""
        held = [w for module, _ in self.linears() for w in (module.weight, getattr(module, "packed", None))]
        held += [w for layer in self.layers for w in (layer.attention.wqkv_packed, layer.feed_forward.w13_packed)]
        held += [self.embed_packed, self.output_packed]
        yield from {id(w): w for w in held if w is not None}.values()

    def weight_bytes(self) -> int:
        """Bytes of the base weights as held (packed or plain; a tied weight counted once)."""
        return sum(w.numel() * w.element_size() if isinstance(w, Tensor) else w.nbytes for w in self.held_weights())
