"""The model runner: owns the device tensors — KV cache slots, per-slot adapter prompt K/V — and runs forwards.

- KV cache: `n_slots` slots of `max_context` positions each (`KVCache`), sized by the engine from a byte
  budget. A sequence keeps one slot from admission to finish; stale entries past a row's position are
  masked by the model, so a freed slot is reused without clearing.
- Per slot, computed once at admission: the adapter id and the adaption-prompt K/V of every adapted layer
  (from the visual query of each image). Visual queries are kept in an LRU keyed by (adapter, image
  sha256), so the same image arriving again costs no CLIP/visual encoding.
- `prefill` runs one prompt chunk of one sequence; `decode` runs one token for each of B sequences in one
  batched forward (rows at different positions, different adapters). Both return float32 logits on the CPU
  (sampling is per row on the host); everything else lives on the model's device.
- Optionally (`compile_decode`, plain models), the batch-1 decode step goes through torch.compile (Inductor
  with frozen weights and the C++ wrapper): one graph, dynamic in the key length, compiled at warmup. Batch 1
  is where Python and per-op overhead dominate (larger batches amortise it, prefill is GEMM-bound), so only it
  is compiled.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor

from models.llama import KVCache, PromptKV, Step, rotations
from models.loading import LoadedModel
from server.engine.types import EngineObserver, ImageInput, NullObserver

log = logging.getLogger("lamina.engine")


@dataclass(frozen=True)
class RunnerStats:
    vision_hits: int
    vision_misses: int


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        *,
        n_slots: int,
        max_context: int,
        kv_dtype: torch.dtype,
        max_images: int = 4,
        vision_cache_size: int = 64,
        compile_decode: bool = False,
    ):
        self.model = loaded.model
        self.llama = loaded.model.llama
        args = self.llama.args
        self.args = args
        self.n_slots, self.max_context = n_slots, max_context
        self.device = dev = self.llama.norm.weight.device  # where the model is (the loader put it)
        self.weight_bytes = self.llama.weight_bytes()  # fixed once loaded: /metrics reads it at every scrape
        self.cache = KVCache.allocate(args, n_slots, max_context, kv_dtype, device=dev)
        self.adapters = args.n_adapters > 0
        self.slot_adapter = torch.zeros(n_slots, dtype=torch.long, device=dev)  # (S,)
        # adaption prompts: up to max_images × query_len per slot; `slot_prompts` counts the valid ones
        self.prompts_on = self.adapters and args.query_len > 0 and len(args.adapted_layers) > 0
        if self.prompts_on:
            P = args.query_len * max_images
            shape = (len(args.adapted_layers), n_slots, args.kv_heads, P, args.head_dim)
            wdtype = self.llama.dtype
            self.prompt_k = torch.zeros(shape, dtype=wdtype, device=dev)
            self.prompt_v = torch.zeros(shape, dtype=wdtype, device=dev)
        self.slot_prompts = [0] * n_slots
        # slots are the scheduler's names; cache rows are where their K/V live. Decoding slots are kept in
        # rows 0..B-1 (swapping rows when needed) so the model reads the cache through views, not gathers.
        self.row_of, self.slot_of = list(range(n_slots)), list(range(n_slots))
        self.length = [0] * n_slots  # per slot: cache positions written (what a row swap must move)
        self.max_images = max_images
        self.vision_cache: OrderedDict[tuple[int, str], Tensor] = OrderedDict()
        self.vision_cache_size = vision_cache_size
        self.vision_hits = self.vision_misses = 0
        self.observer: EngineObserver = NullObserver()  # told of timed stages (see AsyncEngine.set_observer)
        self.compiled = None
        if compile_decode and self.adapters:
            # Inductor 2.14's oneDNN weight-prepack pass fails on the per-adapter bias/LoRA graph ("expected
            # packed_weight_node.target to be mkldnn._reorder_linear_weight"): adapter models decode eagerly
            log.warning("compile_decode: not available for adapter models (an Inductor prepack bug); decoding eagerly")
        elif compile_decode and self.llama.fused is not None:
            log.info("compile_decode: not needed, the model runs the fused CPU forward (faster than compiled)")
        elif compile_decode:
            self.compiled = _compile(self._decode_one)

    @property
    def kv_bytes(self) -> int:
        return self.cache.nbytes

    # ------------------------------------------------------------------------------------------ admission

    def visual_query(self, image: ImageInput | None, adapter_id: int) -> Tensor:
        """(Q, dim) visual query of one image (None: the zero image), from the LRU when seen before."""
        key = (adapter_id, image.sha256 if image is not None else "zero-image")
        vq = self.vision_cache.get(key)
        if vq is not None:
            self.vision_hits += 1
            self.vision_cache.move_to_end(key)
            return vq
        self.vision_misses += 1
        t0 = time.perf_counter()
        pixels = (image.pixels if image is not None else self.model.zero_image()[0])[None].to(self.device)
        vq = self.model.encode_image(pixels, adapter_id)[0]  # (Q, dim)
        self.observer.on_stage("visual_encode", time.perf_counter() - t0)
        self.vision_cache[key] = vq
        if len(self.vision_cache) > self.vision_cache_size:
            self.vision_cache.popitem(last=False)
        return vq

    @torch.inference_mode()
    def admit(self, slot: int, adapter_id: int, images: tuple[ImageInput, ...], cached: int = 0) -> None:
        """Sets up a slot for a new sequence: its adapter and the prompt K/V of its image(s). `cached`: positions
        whose K/V the slot already holds for this sequence (same adapter, images and tokens: prefix reuse)."""
        self.slot_adapter[slot] = adapter_id
        self.length[slot] = cached
        if not self.prompts_on:
            return
        vqs = [self.visual_query(img, adapter_id) for img in images] or [self.visual_query(None, adapter_id)]
        pkv = self.model.prompt_kv(vqs, adapter_id)  # k, v: (n_adapted, 1, K, P, D)
        P = pkv.k.shape[3]
        self.prompt_k[:, slot, :, :P] = pkv.k[:, 0]
        self.prompt_v[:, slot, :, :P] = pkv.v[:, 0]
        self.slot_prompts[slot] = P

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Shares a prefilled prompt with another choice of the same request (n > 1)."""
        a, b = self.row_of[src], self.row_of[dst]
        for t in self.cache.k + self.cache.v:
            t[b, :, :length] = t[a, :, :length]
        self.length[dst] = length
        self.slot_adapter[dst] = self.slot_adapter[src]
        if self.prompts_on:
            self.prompt_k[:, dst], self.prompt_v[:, dst] = self.prompt_k[:, src], self.prompt_v[:, src]
            self.slot_prompts[dst] = self.slot_prompts[src]

    def _batch_inputs(self, slots: list[int]) -> tuple[Tensor | None, PromptKV | None]:
        if not self.adapters:
            return None, None
        idx = torch.tensor(slots, device=self.device)
        adapter_ids = self.slot_adapter[idx]  # (B,)
        if not self.prompts_on:
            return adapter_ids, None
        counts = [self.slot_prompts[s] for s in slots]
        P = max(counts)
        k, v = self.prompt_k[:, idx, :, :P], self.prompt_v[:, idx, :, :P]  # (n_adapted, B, K, P, D)
        mask = None
        if min(counts) != P:
            mask = torch.arange(P, device=self.device)[None, :] < torch.tensor(counts, device=self.device)[:, None]
        return adapter_ids, PromptKV(k, v, mask)

    # ------------------------------------------------------------------------------------------- forwards

    def warmup(self) -> None:
        """Runs the forward paths once before serving (first-call allocations, oneDNN primitive creation; the
        compiled decode is compiled here). A compile that fails (e.g. no C++ compiler) leaves eager decode."""
        self.prefill(0, [0, 0], 0)
        if self.compiled is not None:
            try:
                self.decode([0], [0], [2])
            except Exception as e:  # noqa: BLE001 - any compiler failure: the eager path is always available
                log.warning("compile_decode: compiling failed, decoding eagerly: %s", str(e).strip()[:500])
                self.compiled = None
        self.decode([0], [0], [2])

    @torch.inference_mode()
    def prefill(self, slot: int, tokens: list[int], start: int) -> Tensor:
        """Writes tokens at positions start.. into the slot; returns the last position's logits (V,)."""
        t0 = time.perf_counter()
        adapter_ids, pkv = self._batch_inputs([slot])
        self.length[slot] = max(self.length[slot], start + len(tokens))
        logits = self.llama(
            self._ids([tokens]), torch.arange(start, start + len(tokens), device=self.device)[None],
            cache=self.cache, slots=self._ids([self.row_of[slot]]), adapter_ids=adapter_ids, prompt_kv=pkv,
        )  # (1, V)
        out = logits[0].cpu()
        self.observer.on_stage("prefill", time.perf_counter() - t0)
        return out

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> Tensor:
        """One new token per row → logits (B, V)."""
        B = len(slots)
        self._compact(slots)
        if B == 1 and self.compiled is not None:
            self.length[slots[0]] = max(self.length[slots[0]], positions[0] + 1)
            adapter_ids, pkv = self._batch_inputs(slots)
            keys = torch.arange(positions[0] + 1, device=self.device)  # its length: the graph's dynamic dimension
            torch._dynamo.mark_dynamic(keys, 0)
            return self.compiled(self._ids([[tokens[0]]]), keys, adapter_ids, pkv).cpu()
        order = sorted(range(B), key=lambda i: self.row_of[slots[i]])  # batch row i reads cache row i
        slots, tokens, positions = [slots[i] for i in order], [tokens[i] for i in order], [positions[i] for i in order]
        for s, p in zip(slots, positions, strict=True):
            self.length[s] = max(self.length[s], p + 1)
        adapter_ids, pkv = self._batch_inputs(slots)
        logits = self.llama(
            self._ids(tokens)[:, None], self._ids(positions)[:, None], cache=self.cache,
            slots=torch.arange(B, device=self.device), adapter_ids=adapter_ids, prompt_kv=pkv,
        )  # (B, V) in row order
        if order != list(range(B)):
            logits = logits[self._ids(order).argsort()]
        return logits.cpu()

    def _ids(self, values: list) -> Tensor:
        return torch.tensor(values, device=self.device)

    def _decode_one(self, tokens: Tensor, keys: Tensor, adapter_ids: Tensor | None, pkv: PromptKV | None) -> Tensor:
        """Batch-1 decode of the sequence in cache row 0 at position len(keys) - 1, without host syncs (what
        `Transformer.step` works out from Python lists is derived from tensor shapes here)."""
        a = self.args
        L = keys.shape[0]
        positions = keys[-1:][None]  # (1, 1)
        rot = rotations(positions, a.head_dim, a.rope_theta)
        writes = torch.arange(a.kv_heads, device=keys.device) * self.cache.max_len + (L - 1)  # row 0: (head, position) rows
        step = Step(rot, None, slice(0, 1), writes, L)
        return self.llama.run(tokens, step, cache=self.cache, adapter_ids=adapter_ids, prompt_kv=pkv)

    def _compact(self, slots: list[int]) -> None:
        """Moves the given slots' K/V into cache rows 0..B-1 (swapping with the rows' current holders)."""
        B, want = len(slots), set(slots)
        outside = [s for s in slots if self.row_of[s] >= B]
        spare = [r for r in range(B) if self.slot_of[r] not in want]
        for s, r in zip(outside, spare, strict=True):
            a, other = self.row_of[s], self.slot_of[r]
            n = max(self.length[s], self.length[other])
            if n:
                for t in self.cache.k + self.cache.v:
                    held = t[r, :, :n].clone()
                    t[r, :, :n] = t[a, :, :n]
                    t[a, :, :n] = held
            self.row_of[s], self.row_of[other] = r, a
            self.slot_of[r], self.slot_of[a] = s, other


def _compile(fn):
    """torch.compile for CPU decode: Inductor with the weights frozen as constants (so it prepacks them for
    oneDNN, as `pack_weights` does for eager) and the C++ wrapper (no Python between kernels). On a 2-core CPU
    this compiles for about a minute at warmup; the FX graph cache does not apply to frozen graphs."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    inductor.cpp_wrapper = True
    return torch.compile(fn, fullgraph=True)  # dynamic in what `mark_dynamic` marks only
