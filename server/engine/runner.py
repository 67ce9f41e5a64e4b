"""The model runner: owns the device tensors — KV cache slots, per-slot adapter prompt K/V — and runs forwards.

- KV cache: `n_slots` slots of `max_context` positions each (`KVCache`), sized by the engine from a byte
  budget. A sequence keeps one slot from admission to finish; stale entries past a row's position are
  masked by the model, so a freed slot is reused without clearing.
- Per slot, computed once at admission: the adapter id and the adaption-prompt K/V of every adapted layer
  (from the visual query of each image). Visual queries are kept in an LRU keyed by (adapter, image
  sha256), so the same image arriving again costs no CLIP/visual encoding.
- `forward` runs one engine step's new tokens — every running sequence's decode token and every prompt chunk
  scheduled — as few forwards as it can: on the fused CPU path all of them in one (packed rows: each token
  carries its own cache row and position); otherwise the one-token rows in one batched forward and the longer
  chunks padded into batches (padding's K/V go to a scratch cache row nobody reads). It returns float32 logits
  on the CPU for the chunks that ask (sampling is per row on the host); everything else lives on the model's
  device. `prefill` and `decode` are its one-sequence and all-decode cases.
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

from models.llama import ForwardState, KVCache, PromptKV, rotations
from models.loading import LoadedModel
from server.engine.types import EngineObserver, ImageInput, NullObserver

log = logging.getLogger("lamina.engine")


@dataclass(frozen=True)
class RunnerStats:
    vision_hits: int
    vision_misses: int


@dataclass(frozen=True)
class Chunk:
    """New tokens of one sequence for one step: `tokens` go into its slot's K/V at positions start...;
    `logits`: the step returns the logits at its last token (a decode row, or a prompt's last chunk)."""

    slot: int
    tokens: tuple[int, ...]
    start: int
    logits: bool = True


class CacheRows:
    """Which KV-cache row holds which slot's K/V. Slots are the scheduler's names for sequences; rows index the
    cache tensors. The batched decode reads rows 0..B-1 through views, so `gather_front` moves the decoding
    slots there, swapping rows with their holders (only the positions written, `length`, are moved)."""

    def __init__(self, cache: KVCache, n_slots: int):
        self.cache = cache
        self.row_of, self.slot_of = list(range(n_slots)), list(range(n_slots))
        self.length = [0] * n_slots  # per slot: cache positions written

    def row(self, slot: int) -> int:
        return self.row_of[slot]

    def reset(self, slot: int, length: int) -> None:
        """A new sequence in `slot`, whose first `length` positions are already right (prefix reuse)."""
        self.length[slot] = length

    def wrote(self, slot: int, end: int) -> None:
        self.length[slot] = max(self.length[slot], end)

    def copy(self, src: int, dst: int, length: int) -> None:
        a, b = self.row_of[src], self.row_of[dst]
        for t in self.cache.k + self.cache.v:
            t[b, :, :length] = t[a, :, :length]
        self.length[dst] = length

    def gather_front(self, slots: list[int]) -> None:
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
        deterministic: bool = False,
    ):
        self.model = loaded.model
        self.llama = loaded.model.llama
        args = self.llama.args
        self.args = args
        self.n_slots, self.max_context = n_slots, max_context
        self.device = dev = self.llama.norm.weight.device  # where the model is (the loader put it)
        self.weight_bytes = self.llama.weight_bytes()  # fixed once loaded: /metrics reads it at every scrape
        # one row more than slots: the scratch row, where padding's K/V are written (never read)
        self.cache = KVCache.allocate(args, n_slots + 1, max_context, kv_dtype, device=dev)
        self.scratch_row = n_slots
        self.rows = CacheRows(self.cache, n_slots)
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
        self.max_images = max_images
        self.vision_cache: OrderedDict[tuple[int, str], Tensor] = OrderedDict()
        self.vision_cache_size = vision_cache_size
        self.vision_hits = self.vision_misses = 0
        self.observer: EngineObserver = NullObserver()  # told of timed stages (see AsyncEngine.set_observer)
        self.compiled = None
        # deterministic: every token its own forward (batch 1, one position: the same shapes and kernels
        # however it is batched, chunked or cached) unless the fused forward, batch-invariant by construction, runs
        self.one_token_forwards = deterministic and self.llama.fused is None
        if deterministic:
            log.info("deterministic: %s", "the fused CPU forward is batch-invariant, nothing changes"
                     if not self.one_token_forwards else "every token runs as its own forward (slower prefill)")
        if compile_decode and self.llama.fused is not None:
            log.info("compile_decode: not needed, the model runs the fused CPU forward (faster than compiled)")
        elif compile_decode and self.one_token_forwards:
            log.warning("compile_decode: off in deterministic mode (tokens run one at a time, eagerly)")
        elif compile_decode and self.adapters:
            # Inductor 2.14's oneDNN weight-prepack pass fails on the per-adapter bias/LoRA graph ("expected
            # packed_weight_node.target to be mkldnn._reorder_linear_weight"): adapter models decode eagerly
            log.warning("compile_decode: not available for adapter models (an Inductor prepack bug); decoding eagerly")
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
        self.rows.reset(slot, cached)
        if not self.prompts_on:
            return
        if not self.model.has_visual(adapter_id):  # the base row (zero gate): zero prompts add exactly nothing
            P = self.args.query_len
            self.prompt_k[:, slot, :, :P] = 0
            self.prompt_v[:, slot, :, :P] = 0
            self.slot_prompts[slot] = P
            return
        vqs = [self.visual_query(img, adapter_id) for img in images] or [self.visual_query(None, adapter_id)]
        pkv = self.model.prompt_kv(vqs, adapter_id)  # k, v: (n_adapted, 1, K, P, D)
        P = pkv.k.shape[3]
        self.prompt_k[:, slot, :, :P] = pkv.k[:, 0]
        self.prompt_v[:, slot, :, :P] = pkv.v[:, 0]
        self.slot_prompts[slot] = P

    @torch.inference_mode()
    def install_adapter(self, adapter_id: int, row: dict[str, Tensor], visual) -> None:
        """An adapter into a free bank row (no running sequence uses it): the banks in place, the fused forward's
        derived tensors again, and the row's visual queries forgotten (they were another adapter's)."""
        self.model.install(adapter_id, row, visual)
        if self.llama.fused is not None:
            self.llama.prepare_fused()
        for key in [k for k in self.vision_cache if k[0] == adapter_id]:
            del self.vision_cache[key]

    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Shares a prefilled prompt with another choice of the same request (n > 1)."""
        self.rows.copy(src, dst, length)
        self.slot_adapter[dst] = self.slot_adapter[src]
        if self.prompts_on:
            self.prompt_k[:, dst], self.prompt_v[:, dst] = self.prompt_k[:, src], self.prompt_v[:, src]
            self.slot_prompts[dst] = self.slot_prompts[src]

    def _batch_inputs(self, slots: list[int]) -> tuple[Tensor | None, PromptKV | None]:
        """Each batch row's adapter id and its slot's adaption prompts, referenced in place (by row: the fused
        forward reads them there; the eager one gathers them, see PromptKV.gathered)."""
        if not self.adapters:
            return None, None
        idx = self._ids(slots)
        adapter_ids = self.slot_adapter[idx]  # (B,)
        if not self.prompts_on:
            return adapter_ids, None
        return adapter_ids, PromptKV(self.prompt_k, self.prompt_v, rows=idx,
                                     lengths=self._ids([self.slot_prompts[s] for s in slots]))

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

    def forward(self, chunks: list[Chunk]) -> Tensor | None:
        """Runs one step's chunks (each slot at most once) → logits (M, V) of the chunks that ask, in order."""
        t0 = time.perf_counter()
        for c in chunks:
            self.rows.wrote(c.slot, c.start + len(c.tokens))
        if self.llama.fused is not None:  # the fused CPU forward: one call, packed rows (it records no autograd)
            out = self._forward_packed(chunks)
        else:
            out = self._forward_eager(chunks)
        prefill = any(len(c.tokens) > 1 or not c.logits for c in chunks)
        self.observer.on_stage("prefill" if prefill else "decode", time.perf_counter() - t0)
        return out

    @torch.inference_mode()
    def _forward_eager(self, chunks: list[Chunk]) -> Tensor | None:
        if self.one_token_forwards:
            out = self._forward_one_by_one(chunks)
        else:
            out = {}
            single = [i for i, c in enumerate(chunks) if len(c.tokens) == 1]
            if single:
                logits = self._forward_rows([chunks[i] for i in single])
                out.update(zip(single, logits, strict=True))
            for group in _pad_groups([i for i, c in enumerate(chunks) if len(c.tokens) > 1], chunks):
                logits = self._forward_padded([chunks[i] for i in group])
                out.update(zip([i for i in group if chunks[i].logits], logits, strict=True))
            out = [out[i] for i, c in enumerate(chunks) if c.logits]
            out = torch.stack(out) if out else None
        return None if out is None else out.cpu()

    def prefill(self, slot: int, tokens: list[int], start: int) -> Tensor:
        """Writes tokens at positions start.. into the slot; returns the last position's logits (V,)."""
        return self.forward([Chunk(slot, tuple(tokens), start)])[0]

    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> Tensor:
        """One new token per slot → logits (B, V)."""
        return self.forward([Chunk(s, (t,), p) for s, t, p in zip(slots, tokens, positions, strict=True)])

    def _forward_packed(self, chunks: list[Chunk]) -> Tensor | None:
        """Every token of the step as its own batch row (its cache row, its position), in one fused forward:
        the kernel writes all new K/V before any query reads, so a prompt's tokens see each other."""
        tokens, rows, positions, want, slots = [], [], [], [], []  # per token
        for c in chunks:
            tokens += c.tokens
            rows += [self.rows.row(c.slot)] * len(c.tokens)
            slots += [c.slot] * len(c.tokens)
            positions += range(c.start, c.start + len(c.tokens))
            if c.logits:
                want.append(len(tokens) - 1)
        adapter_ids, pkv = self._batch_inputs(slots)  # each token reads its slot's prompts in place
        logits = self.llama.forward_fused(self.cache, tokens, rows, positions, want or [0],  # [0]: a row nobody reads
                                          None if adapter_ids is None else adapter_ids.tolist(), pkv)
        return logits if want else None

    def _forward_one_by_one(self, chunks: list[Chunk]) -> Tensor | None:
        """Deterministic mode off the fused path: each token alone, in order, in its own cache row, attending
        to exactly its positions 0..p (no padding, no mask) — the one path every token takes."""
        out = []
        for c in chunks:
            row = self._ids([self.rows.row(c.slot)])
            adapter_ids, pkv = self._batch_inputs([c.slot])
            for i, token in enumerate(c.tokens):
                logits = self.llama(self._ids([[token]]), self._ids([[c.start + i]]), cache=self.cache, rows=row,
                                    adapter_ids=adapter_ids, prompt_kv=pkv)
            if c.logits:
                out.append(logits[0])
        return torch.stack(out) if out else None

    def _forward_rows(self, chunks: list[Chunk]) -> Tensor:
        """One token per sequence in one batched forward (rows at different positions, different adapters)."""
        slots, tokens, positions = [c.slot for c in chunks], [c.tokens[0] for c in chunks], [c.start for c in chunks]
        B = len(slots)
        self.rows.gather_front(slots)
        if B == 1 and self.compiled is not None:
            adapter_ids, pkv = self._batch_inputs(slots)
            keys = torch.arange(positions[0] + 1, device=self.device)  # its length: the graph's dynamic dimension
            torch._dynamo.mark_dynamic(keys, 0)
            return self.compiled(self._ids([[tokens[0]]]), keys, adapter_ids, pkv)
        order = sorted(range(B), key=lambda i: self.rows.row(slots[i]))  # batch row i reads cache row i
        slots, tokens, positions = [slots[i] for i in order], [tokens[i] for i in order], [positions[i] for i in order]
        adapter_ids, pkv = self._batch_inputs(slots)
        logits = self.llama(
            self._ids(tokens)[:, None], self._ids(positions)[:, None], cache=self.cache,
            rows=torch.arange(B, device=self.device), adapter_ids=adapter_ids, prompt_kv=pkv,
        )  # (B, V) in row order
        if order != list(range(B)):
            logits = logits[self._ids(order).argsort()]
        return logits

    def _forward_padded(self, chunks: list[Chunk]) -> Tensor:
        """Prompt chunks of several sequences in one forward, right-padded to the longest: padding repeats the
        chunk's last position (so it adds no keys) and writes its K/V to the scratch row."""
        T = max(len(c.tokens) for c in chunks)
        tokens = [list(c.tokens) + [0] * (T - len(c.tokens)) for c in chunks]
        positions = [[c.start + min(t, len(c.tokens) - 1) for t in range(T)] for c in chunks]
        pad = [[t >= len(c.tokens) for t in range(T)] for c in chunks]
        want = [b * T + len(c.tokens) - 1 for b, c in enumerate(chunks) if c.logits]
        adapter_ids, pkv = self._batch_inputs([c.slot for c in chunks])
        padded = T * len(chunks) > sum(len(c.tokens) for c in chunks)
        logits = self.llama(
            self._ids(tokens), self._ids(positions), cache=self.cache, rows=self._ids([self.rows.row(c.slot) for c in chunks]),
            adapter_ids=adapter_ids, prompt_kv=pkv, logit_index=self._ids(want or [0]),  # [0]: a row nobody reads
            pad=self._ids(pad) if padded else None, scratch_row=self.scratch_row,
        )
        return logits if want else logits[:0]

    def _ids(self, values: list) -> Tensor:
        return torch.tensor(values, device=self.device)

    def _decode_one(self, tokens: Tensor, keys: Tensor, adapter_ids: Tensor | None, pkv: PromptKV | None) -> Tensor:
        """Batch-1 decode of the sequence in cache row 0 at position len(keys) - 1, without host syncs (what
        `Transformer.forward_state` works out from Python lists is derived from tensor shapes here)."""
        a = self.args
        L = keys.shape[0]
        positions = keys[-1:][None]  # (1, 1)
        rot = rotations(positions, a.head_dim, a.rope_theta)
        writes = torch.arange(a.kv_heads, device=keys.device) * self.cache.max_len + (L - 1)  # row 0: (head, position) rows
        state = ForwardState(rot, None, slice(0, 1), writes, L)
        return self.llama.run(tokens, state, cache=self.cache, adapter_ids=adapter_ids, prompt_kv=pkv)



def _pad_groups(indices: list[int], chunks: list[Chunk], waste: float = 0.25) -> list[list[int]]:
    """Groups multi-token chunks for padded forwards: longest first, a group closes when padding would exceed
    `waste` of its tokens (a burst of similar prompts is one forward; a long chunk does not pad short ones)."""
    groups: list[list[int]] = []
    for i in sorted(indices, key=lambda i: -len(chunks[i].tokens)):
        g = groups[-1] if groups else None
        if g is not None:
            T = len(chunks[g[0]].tokens)
            real = sum(len(chunks[j].tokens) for j in g) + len(chunks[i].tokens)
            if T * (len(g) + 1) <= (1 + waste) * real:
                g.append(i)
                continue
        groups.append([i])
    return groups


def _compile(fn):
    """torch.compile for CPU decode: Inductor with the weights frozen as constants (so it prepacks them for
    oneDNN, as `pack_weights` does for eager) and the C++ wrapper (no Python between kernels). On a 2-core CPU
    this compiles for about a minute at warmup; the FX graph cache does not apply to frozen graphs."""
    import torch._inductor.config as inductor

    inductor.freezing = True
    inductor.cpp_wrapper = True
    return torch.compile(fn, fullgraph=True)  # dynamic in what `mark_dynamic` marks only
