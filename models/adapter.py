"""LLaMA-Adapter V2 multimodal model: the LLaMA transformer, the CLIP tower and each adapter's visual path.

One frozen base and one CLIP tower are shared by `n_adapters` adapters. Per request:
`encode_image` → visual query (B, Q, dim) once, then `prompt_kv` → the adaption-prompt keys/values of every
adapted layer once; the generation steps then reuse them (the reference recomputes both at every step).
A plain Llama-family model (no adapters, no CLIP) is the same class with `clip=None` and no adapters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.config import ModelArgs
from models.llama import PromptKV, Transformer
from models.visual import ClipTower, VisualAdapter


def is_bank(name: str) -> bool:
    """Whether a Transformer parameter is an adapter bank (a row per adapter): norms, biases, LoRA, gates; the
    base weights (`….weight` but the norms) are not."""
    return not name.endswith(".weight") or "norm" in name


class NoVisual(nn.Module):
    """The visual path of a bank row that has none (a server's base row, a free row): it takes no image, and its
    rows get zero adaption prompts, which with its zero gate add exactly nothing."""


class LlamaAdapterV2(nn.Module):
    def __init__(self, args: ModelArgs, clip: ClipTower | None, visual: list[VisualAdapter | NoVisual]):
        super().__init__()
        if len(visual) != args.n_adapters:
            raise ValueError(f"{len(visual)} visual adapters for n_adapters={args.n_adapters}")
        self.args = args
        self.llama = Transformer(args)
        self.clip = clip
        self.visual = nn.ModuleList(visual)

    def has_visual(self, adapter_id: int) -> bool:
        return isinstance(self.visual[adapter_id], VisualAdapter)

    @torch.no_grad()
    def install(self, adapter_id: int, row: dict[str, Tensor], visual: VisualAdapter | NoVisual) -> None:
        """Writes an adapter into bank row `adapter_id` (every bank tensor: `models.loading.read_runtime_adapter`)
        and sets its visual path. In place, so what refers to the banks (the fused forward) sees it; the caller
        makes sure no running sequence uses the row."""
        banks = {n for n, _ in self.llama.named_parameters() if is_bank(n)}
        if set(row) != banks:
            raise ValueError(f"an adapter row needs every bank: missing {sorted(banks - set(row))[:4]}, "
                             f"unknown {sorted(set(row) - banks)[:4]}")
        for name, t in row.items():
            param = self.llama.get_parameter(name)
            param[adapter_id].copy_(t.reshape(param.shape[1:]).to(param.dtype))
        self.visual[adapter_id] = visual

    @property
    def multimodal(self) -> bool:
        return self.clip is not None and len(self.visual) > 0

    @property
    def image_size(self) -> int:
        return self.clip.image_size if self.clip is not None else 224

    def zero_image(self, batch: int = 1) -> Tensor:
        """The training convention for text-only requests: an all-zero tensor after normalisation."""
        return torch.zeros(batch, 3, self.image_size, self.image_size)

    @torch.inference_mode()
    def clip_tokens(self, images: Tensor) -> Tensor:
        """(B, 3, S, S) normalised images → CLIP tokens (B, N, clip_dim). Independent of the adapter."""
        return self.clip(images)

    @torch.inference_mode()
    def visual_query(self, clip_tokens: Tensor, adapter_id: int) -> Tensor:
        """CLIP tokens → this adapter's visual query (B, query_len, dim), in the model's dtype."""
        return self.visual[adapter_id](clip_tokens).to(self.llama.dtype)

    def encode_image(self, images: Tensor, adapter_id: int) -> Tensor:
        return self.visual_query(self.clip_tokens(images), adapter_id)

    @torch.inference_mode()
    def prompt_kv(self, visual_queries: list[Tensor], adapter_id: int) -> PromptKV:
        """Adaption-prompt K/V for one request with one or more images.

        Each image contributes `adapter_query + its visual query` (query_len prompts per adapted layer);
        several images are concatenated along the prompt axis and share the one prompt softmax (one image
        is exactly the reference; more than one is an untrained extension).
        Returns k, v of shape (n_adapted, 1, K, P, D) with P = query_len × n_images.
        """
        adapter = self.visual[adapter_id]
        prompts = torch.cat([adapter.prompts(vq[None] if vq.dim() == 2 else vq) for vq in visual_queries], dim=2)
        k, v = self.llama.prompt_kv(prompts.to(self.llama.dtype))
        return PromptKV(k, v)
