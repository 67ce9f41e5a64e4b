"""Continuous-batching scheduler: waiting queue, cache slots, admission, chunked-prefill budget, stops.

Pure Python (no torch), so it is unit-tested with hand-made outputs. Each choice of a request is one
`Sequence` holding one KV-cache slot from admission to finish. Every step decodes one token for each running
sequence whose prompt is in the cache, and spends the rest of a token budget on prompt chunks (sequences
still prefilling first, then newly admitted ones) so a long prompt never stalls running streams for long. The
runner computes the whole step — decode rows and prompt chunks — in one forward where it can.
Stop strings need text and are checked by the core, which then calls `finish`.

Prefix reuse: a freed slot keeps its K/V rows until it is reused, and the scheduler remembers what they hold
(the tokens and the sequence's `cache_key`: in LLaMA-Adapter V2 the adapter and the images enter every adapted
layer, so text K/V is only reusable under the same adapter and images). A newly admitted sequence takes the
free slot holding the longest common prefix under an equal key and starts its prefill after it — a follow-up
turn of a chat re-prefills only what is new. Without a match it takes the least recently freed slot.

n > 1: the choices of a request share their prompt. Choices 1.. wait while choice 0 prefills it, then copy its
K/V (`fork_of`) and prefill only the last prompt token themselves (for their own first-token logits); if choice 0
has already finished, its retained slot serves them through prefix reuse instead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from server.engine.types import FinishReason


@dataclass(eq=False)
class Sequence:
    """One choice of one request: its tokens and where they are in the KV cache (engine-internal, mutable)."""

    request_id: str
    index: int  # choice index
    prompt_ids: list[int]
    max_tokens: int
    stop_ids: frozenset[int] = frozenset()
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    slot: int | None = None
    finish_reason: FinishReason | None = None
    cache_key: Hashable = None  # what its K/V depend on besides the tokens (adapter, images)
    num_cached: int = 0  # prompt tokens found in its slot's retained K/V at admission (not recomputed)
    parent: Sequence | None = None  # choice 0 of its request (n > 1): the prompt is prefilled once, there
    fork_of: int | None = None  # at admission: the slot whose prompt K/V the runner copies (`num_cached` rows)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def prefilling(self) -> bool:
        return self.num_computed < len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int  # prompt_ids[start:end] go into the cache at positions start..end-1
    end: int

    @property
    def last(self) -> bool:
        """The chunk completes the prompt: its last logits give the first output token."""
        return self.end == len(self.seq.prompt_ids)


@dataclass(frozen=True)
class SchedulerOutput:
    admitted: tuple[Sequence, ...]  # got a slot this step (the runner sets up their prompt K/V)
    prefill: tuple[PrefillChunk, ...]
    decode: tuple[Sequence, ...]  # one token each: output_ids[-1] at position num_computed

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(self, n_slots: int, max_batch: int, prefill_budget: int, max_context: int,
                 prefix_caching: bool = True):
        self.max_batch = min(max_batch, n_slots)
        self.prefill_budget = prefill_budget
        self.max_context = max_context
        self.prefix_caching = prefix_caching
        self.free_slots: list[int] = list(range(n_slots))  # least recently freed first
        self.retained: dict[int, tuple[Hashable, list[int]]] = {}  # free slot → (cache key, tokens its K/V hold)
        self.n_slots = n_slots
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seqs: list[Sequence]) -> None:
        self.waiting.extend(seqs)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        decode = tuple(s for s in self.running if not s.prefilling)
        budget = max(1, self.prefill_budget - len(decode))  # one token budget: decode rows first, prompts share the rest
        prefill = []
        for seq in self.running:  # continue prompts admitted earlier, oldest first
            if seq.prefilling and budget > 0:
                end = min(len(seq.prompt_ids), seq.num_computed + budget)
                prefill.append(PrefillChunk(seq, seq.num_computed, end))
                budget -= end - seq.num_computed
        admitted, deferred = [], []
        while self.waiting and budget > 0 and self.free_slots and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            parent = seq.parent
            if parent is not None and parent.slot is not None and parent.prefilling:
                deferred.append(seq)  # its prompt is being prefilled by choice 0: fork from it once done
                continue
            self._take_slot(seq)
            if parent is not None and parent.slot is not None and len(seq.prompt_ids) > 1:
                seq.fork_of = parent.slot  # choice 0 holds the prompt's K/V: copy all but the last token
                seq.num_computed = seq.num_cached = len(seq.prompt_ids) - 1
            self.running.append(seq)
            admitted.append(seq)
            end = min(len(seq.prompt_ids), seq.num_computed + budget)
            prefill.append(PrefillChunk(seq, seq.num_computed, end))
            budget -= end - seq.num_computed
        self.waiting.extendleft(reversed(deferred))  # they keep their place at the front
        return SchedulerOutput(tuple(admitted), tuple(prefill), decode)

    def _take_slot(self, seq: Sequence) -> None:
        """The free slot whose retained K/V share the longest prompt prefix with `seq` under the same cache key
        (its prefill then starts there; at least the last prompt token is recomputed, for its logits), else the
        least recently freed one."""
        best, best_len = self.free_slots[0], 0
        if self.prefix_caching:
            for slot in self.free_slots:
                key, tokens = self.retained.get(slot, (None, []))
                if key != seq.cache_key or len(tokens) <= best_len:
                    continue
                n = _common_prefix(tokens, seq.prompt_ids)
                if n > best_len:
                    best, best_len = slot, n
        self.free_slots.remove(best)
        self.retained.pop(best, None)
        seq.slot = best
        seq.num_computed = seq.num_cached = max(0, min(best_len, len(seq.prompt_ids) - 1))

    def computed(self, out: SchedulerOutput) -> None:
        """The runner wrote the scheduled tokens into the cache."""
        for chunk in out.prefill:
            chunk.seq.num_computed = chunk.end
        for seq in out.decode:
            seq.num_computed += 1

    def append_token(self, seq: Sequence, token: int) -> FinishReason | None:
        """Record a sampled token and apply the token-level stops; finishes the sequence if one hits."""
        seq.output_ids.append(token)
        if token in seq.stop_ids:
            reason: FinishReason | None = "stop"
        elif len(seq.output_ids) >= seq.max_tokens or seq.num_tokens >= self.max_context:
            reason = "length"
        else:
            return None
        self.finish(seq, reason)
        return reason

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Ends a sequence (stop, length, abort) and frees its slot at once."""
        if seq.finished:
            return
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            self.free_slots.append(seq.slot)
            self.retained[seq.slot] = (seq.cache_key, (seq.prompt_ids + seq.output_ids)[: seq.num_computed])
            seq.slot = None

    def abort(self, request_id: str, reason: FinishReason = "abort") -> list[Sequence]:
        """Finishes every unfinished choice of a request (freeing their slots); returns them."""
        seqs = [s for s in (*self.waiting, *self.running) if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, reason)
        return seqs

    def forget(self, stale: Callable[[Hashable], bool]) -> None:
        """Drops the retained K/V of the cache keys `stale` picks (an adapter row that another adapter takes)."""
        for slot in [s for s, (key, _) in self.retained.items() if stale(key)]:
            del self.retained[slot]

    @property
    def slots_in_use(self) -> int:
        return self.n_slots - len(self.free_slots)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
