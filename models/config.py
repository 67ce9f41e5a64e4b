"""Frozen configuration dataclasses for the language model and the visual path.

`ModelArgs` covers both a plain Llama-family model (Meta LLaMA, SmolLM2, ...) and the LLaMA-Adapter V2
additions (biases, LoRA, gates, adaption prompts). Adapter-side tensors are stored as *banks* with a
leading adapter dimension of size `n_adapters`, so several adapters share one frozen base and requests
for different adapters can run in one batch (each row picks its bank row by adapter id).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: same as n_heads (no grouped-query attention)
    vocab_size: int = 32000
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    hidden_dim: int | None = None  # explicit FFN width (GGUF/HF configs give it directly)
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    # LLaMA-Adapter V2 (all off for a plain model)
    n_adapters: int = 0  # bank size: how many adapters share this base
    w_bias: bool = False  # biases on wq, wo, w1, w2, w3
    w_lora: bool = False  # LoRA on wq, wk, wv, wo, w1, w2, w3 (no alpha scaling)
    lora_rank: int = 16
    w_new_gate: bool = False  # scalar gate multiplied into the adapter attention
    query_len: int = 0  # adaption prompt length per adapted layer (0: no adaption prompts)
    query_layer: int = 0  # how many layers get adaption prompts
    early_fusion: bool = False  # paper variant: prompts in the first `query_layer` layers, not the last

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden(self) -> int:
        if self.hidden_dim is not None:
            return self.hidden_dim
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def adapted_layers(self) -> range:
        """Indices of the transformer layers that receive adaption prompts."""
        if self.query_layer == 0:
            return range(0)
        if self.early_fusion:
            return range(self.query_layer)
        return range(self.n_layers - self.query_layer, self.n_layers)


@dataclass(frozen=True)
class VisualArgs:
    """The adapter-side visual modules (clip_proj → visual queries + blocks → visual_proj)."""

    clip_dim: int = 768  # output dim of the CLIP tower (its `proj`)
    v_embed_dim: int = 768
    v_depth: int = 8
    v_num_heads: int = 16
    v_mlp_ratio: float = 4.0
    query_len: int = 10
    query_layer: int = 31
    llm_dim: int = 4096
