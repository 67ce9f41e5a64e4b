"""The visual path: CLIP ViT tower (open_clip) → clip_proj → visual queries + blocks → visual_proj.

`ClipTower` keeps *all* tokens (CLS + patches) after ln_post and proj, as the reference does.
`VisualAdapter` holds one adapter checkpoint's visual modules and its adaption-prompt table, with the
checkpoint's own key names (`clip_proj`, `visual_blocks.N.attn.qkv`, `adapter_query`, ...).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import VisualArgs

if TYPE_CHECKING:  # open_clip (and torchvision under it) is imported only where a CLIP tower is built: ~250 MB
    from open_clip.transformer import VisionTransformer


class ClipTower(nn.Module):
    """Wraps open_clip's VisionTransformer and returns (B, 1 + n_patches, clip_dim) token features."""

    def __init__(self, visual: VisionTransformer, image_size: int):
        super().__init__()
        self.visual = visual
        self.image_size = image_size

    @property
    def output_dim(self) -> int:
        return self.visual.proj.shape[1]

    def forward(self, images: Tensor) -> Tensor:
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))  # (B, width, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, width)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, N, width)
        x = v.ln_pre(x)
        x = v.transformer(x)
        x = v.ln_post(x)  # on every token, not only CLS
        return x @ v.proj  # (B, N, clip_dim)


class VisualBlock(nn.Module):
    """A pre-LN ViT block with timm's parameter names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, dim * 3)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        H = self.num_heads
        qkv = self.attn.qkv(self.norm1(x)).view(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * (C // H) ** -0.5).softmax(dim=-1)  # (B, H, N, N), bidirectional
        x = x + self.attn.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class VisualAdapter(nn.Module):
    """One adapter's visual modules and adaption prompts."""

    def __init__(self, args: VisualArgs):
        super().__init__()
        self.args = args
        self.clip_proj = nn.Linear(args.clip_dim, args.v_embed_dim)
        self.clip_proj_norm = nn.LayerNorm(args.v_embed_dim, eps=1e-5)
        self.visual_query = nn.Embedding(args.query_len, args.v_embed_dim)
        self.visual_blocks = nn.ModuleList(
            VisualBlock(args.v_embed_dim, args.v_num_heads, args.v_mlp_ratio) for _ in range(args.v_depth)
        )
        self.visual_proj = nn.Linear(args.v_embed_dim, args.llm_dim)
        self.visual_proj_norm = nn.LayerNorm(args.llm_dim, eps=1e-5)
        self.adapter_query = nn.Embedding(args.query_len * args.query_layer, args.llm_dim)

    def forward(self, clip_tokens: Tensor) -> Tensor:
        """CLIP tokens (B, N, clip_dim) → visual query (B, query_len, llm_dim)."""
        f = self.clip_proj_norm(self.clip_proj(clip_tokens.float()))
        B, Q = f.shape[0], self.args.query_len
        x = torch.cat([self.visual_query.weight.expand(B, Q, -1), f], dim=1)  # queries first: (B, Q+N, C)
        for block in self.visual_blocks:
            x = block(x)
        return self.visual_proj_norm(self.visual_proj(x[:, :Q]))

    def prompts(self, visual_query: Tensor) -> Tensor:
        """Adaption prompts of every adapted layer: (n_adapted, B, query_len, llm_dim)."""
        a = self.args
        table = self.adapter_query.weight.view(a.query_layer, 1, a.query_len, a.llm_dim)
        return table + visual_query[None].to(table.dtype)
