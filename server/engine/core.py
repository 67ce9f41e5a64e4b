"""The synchronous engine core: `step()` = schedule → run → update.

It turns requests into sequences (one per choice), runs the scheduler's plan on the model runner, samples,
and turns sampled tokens into per-choice `RequestOutput` deltas: incremental UTF-8-safe text, stop strings
withheld while they may still be forming and never emitted, logprobs, finish reasons. Runs on the engine
thread only; the async front end (engine.py) feeds it and forwards its outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from models.loading import DTYPES, LoadedModel
from models.tokenizer import IncrementalDetokenizer
from server.engine.grammar import Grammars
from server.engine.runner import Chunk, ModelRunner
from server.engine.sampling import Sampled, SamplingState, sample
from server.engine.scheduler import Scheduler, SchedulerOutput, Sequence
from server.engine.types import FinishReason, GenerateRequest, RequestOutput, TokenLogprob

log = logging.getLogger("lamina.engine")


@dataclass(eq=False)
class _Choice:
    """Text-side state of one sequence: detokenizer, stop-string window, sampling state."""

    seq: Sequence
    request: GenerateRequest
    adapter_id: int
    sampling: SamplingState
    detok: IncrementalDetokenizer
    text: str = ""  # decoded output so far (may end in a held-back stop-string prefix)
    emitted: int = 0  # characters of `text` already sent
    pending_ids: list[int] = field(default_factory=list)  # ids since the last delta
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class EngineConfig:
    max_context: int = 2048  # tokens per sequence (prompt + completion)
    max_batch: int = 16  # running sequences (one KV slot each)
    kv_cache_bytes: int | None = None  # KV budget; slots = min(max_batch, budget // bytes per slot)
    max_waiting: int = 64  # requests waiting for a slot (reservations included)
    prefill_chunk: int = 256  # prompt tokens per step: a long prompt never stalls decode for long
    dtype: str | None = None  # KV cache dtype ("fp32" | "bf16" | "fp16"); None: the weights' dtype
    prefix_caching: bool = True  # reuse a freed slot's K/V for a prompt with the same prefix, adapter and images
    compile_decode: bool = False  # batch-1 decode through torch.compile (~1 min at warmup; see ModelRunner)
    deterministic: bool = False  # a token's logits do not depend on its batch, chunking or caching (see ModelRunner)
    max_images: int = 4  # per request
    vision_cache_size: int = 64  # visual queries kept, keyed by (adapter, image sha256)


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where unknown)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def kv_bytes_per_slot(loaded: LoadedModel, max_context: int, dtype: torch.dtype) -> int:
    a = loaded.model.llama.args
    return 2 * a.n_layers * a.kv_heads * max_context * a.head_dim * torch.empty((), dtype=dtype).element_size()


class EngineCore:
    def __init__(self, loaded: LoadedModel, runner: ModelRunner, scheduler: Scheduler,
                 on_admit: Callable[[str], None] | None = None):
        self.loaded, self.runner, self.scheduler = loaded, runner, scheduler
        self.on_admit = on_admit  # told when a request leaves the waiting queue
        self.tokenizer = loaded.tokenizer
        self.grammars = Grammars(loaded.tokenizer, loaded.model.llama.args.vocab_size, loaded.stop_ids)
        self.choices: dict[Sequence, _Choice] = {}
        self.prompt_tokens_total = 0  # prompt tokens prefilled
        self.prompt_tokens_cached_total = 0  # prompt tokens reused from a slot's retained K/V instead
        self.generation_tokens_total = 0

    @staticmethod
    def from_config(loaded: LoadedModel, config: EngineConfig,
                    on_admit: Callable[[str], None] | None = None) -> EngineCore:
        """Sizes the KV cache from the byte budget (slots = min(max_batch, budget // bytes per slot))."""
        weights = loaded.model.llama.dtype
        kv_dtype = DTYPES[config.dtype] if config.dtype else weights
        per_slot = kv_bytes_per_slot(loaded, config.max_context, kv_dtype)
        n_slots = config.max_batch
        if config.kv_cache_bytes is not None:
            n_slots = min(n_slots, config.kv_cache_bytes // per_slot)
            if n_slots < 1:
                raise ValueError(
                    f"a KV cache budget of {config.kv_cache_bytes} bytes cannot hold one sequence of "
                    f"{config.max_context} tokens ({per_slot} bytes); raise the budget or lower max_context"
                )
        else:  # no budget given: what the machine can hold (a CPU cache is committed as it fills, so
            # capacity beyond available memory would fail late, under load, instead of here)
            available = _available_memory() if loaded.model.llama.norm.weight.device.type == "cpu" else None
            if available is not None and n_slots * per_slot > 0.8 * available:
                fit = max(1, int(0.8 * available // per_slot))
                log.warning("KV cache: %d sequences of %d tokens need %.1f GiB, %.1f GiB are available: %d slots "
                            "(set --kv-cache-bytes to choose)", n_slots, config.max_context,
                            n_slots * per_slot / 2**30, available / 2**30, fit)
                n_slots = min(n_slots, fit)
        runner = ModelRunner(loaded, n_slots=n_slots, max_context=config.max_context, kv_dtype=kv_dtype,
                             max_images=config.max_images, vision_cache_size=config.vision_cache_size,
                             compile_decode=config.compile_decode, deterministic=config.deterministic)
        scheduler = Scheduler(n_slots, config.max_batch, config.prefill_chunk, config.max_context,
                              config.prefix_caching)
        return EngineCore(loaded, runner, scheduler, on_admit)

    def generate_all(self, requests: list[tuple[GenerateRequest, int]]) -> dict[str, list[RequestOutput]]:
        """Offline use (tests, benchmarks): adds (request, adapter id) pairs, steps until all have finished."""
        for request, adapter_id in requests:
            self.add_request(request, adapter_id)
        outputs: dict[str, list[RequestOutput]] = {r.request_id: [] for r, _ in requests}
        while self.has_work():
            for out in self.step():
                outputs[out.request_id].append(out)
        return outputs

    # ------------------------------------------------------------------------------------------ requests

    def add_request(self, request: GenerateRequest, adapter_id: int) -> None:
        p = request.sampling
        stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.loaded.stop_ids)
        seqs = []
        key = (adapter_id, tuple(image.sha256 for image in request.images))  # what the text K/V depend on
        for i in range(p.n):
            seq = Sequence(request.request_id, i, list(request.prompt_ids), p.max_tokens, stop_ids, cache_key=key,
                           parent=seqs[0] if seqs else None)
            state = SamplingState.create(p, request.prompt_ids, i, stop_ids)
            if p.grammar is not None:
                state.matcher = self.grammars.matcher(p.grammar)
            self.choices[seq] = _Choice(seq, request, adapter_id, state, IncrementalDetokenizer(self.tokenizer))
            seqs.append(seq)
        self.scheduler.add(seqs)

    # ---------------------------------------------------------------------------------------- adapters

    def uses_adapter(self, adapter_id: int) -> bool:
        """Whether a sequence (waiting or running) still uses the bank row."""
        return any(c.adapter_id == adapter_id for c in self.choices.values())

    def install_adapter(self, adapter_id: int, row: dict, visual) -> None:
        """An adapter into a free bank row, and nothing kept from the row's previous adapter (retained K/V,
        visual queries)."""
        if self.uses_adapter(adapter_id):
            raise RuntimeError(f"adapter row {adapter_id} is in use")
        self.runner.install_adapter(adapter_id, row, visual)
        self.scheduler.forget(lambda key: key is not None and key[0] == adapter_id)

    def abort(self, request_id: str, reason: FinishReason = "abort") -> list[RequestOutput]:
        return [self._finish(seq, reason) for seq in self.scheduler.abort(request_id, reason)]

    def abort_all(self, reason: FinishReason = "abort") -> list[RequestOutput]:
        ids = {c.request.request_id for c in self.choices.values()}
        return [out for rid in ids for out in self.abort(rid, reason)]

    def abort_expired(self, now: float) -> list[RequestOutput]:
        expired = {c.request.request_id for c in self.choices.values()
                   if c.request.deadline is not None and now >= c.request.deadline}
        return [out for rid in expired for out in self.abort(rid)]

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---------------------------------------------------------------------------------------------- step

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        seqs, logits = self.run(plan)
        return self.update(seqs, logits)

    def run(self, plan: SchedulerOutput) -> tuple[list[Sequence], torch.Tensor | None]:
        """Executes the plan; returns the sequences that sample this step and their logits (B, V)."""
        for seq in plan.admitted:
            choice = self.choices[seq]
            self.runner.admit(seq.slot, choice.adapter_id, choice.request.images, cached=seq.num_cached)
            if seq.fork_of is not None:
                self.runner.copy_slot(seq.fork_of, seq.slot, seq.num_cached)
            self.prompt_tokens_cached_total += seq.num_cached
            if self.on_admit is not None:
                self.on_admit(seq.request_id)
            self.runner.observer.on_admit(seq.request_id)
        chunks, rows = [], []
        for seq in plan.decode:
            chunks.append(Chunk(seq.slot, (seq.output_ids[-1],), seq.num_computed))
            rows.append(seq)
        for chunk in plan.prefill:
            seq = chunk.seq
            chunks.append(Chunk(seq.slot, tuple(seq.prompt_ids[chunk.start : chunk.end]), chunk.start, chunk.last))
            self.prompt_tokens_total += chunk.end - chunk.start
            if chunk.last:
                rows.append(seq)
        logits = self.runner.forward(chunks) if chunks else None
        self.scheduler.computed(plan)
        return rows, logits

    def update(self, seqs: list[Sequence], logits: torch.Tensor | None) -> list[RequestOutput]:
        if not seqs:
            return []
        sampled = sample(logits, [self.choices[s].sampling for s in seqs], self.grammars)
        outputs = []
        for seq, s in zip(seqs, sampled, strict=True):
            self.generation_tokens_total += 1
            out = self._on_token(seq, s)
            if out is not None:
                outputs.append(out)
        return outputs

    # ------------------------------------------------------------------------------------------- outputs

    def _on_token(self, seq: Sequence, s: Sampled) -> RequestOutput | None:
        choice = self.choices[seq]
        p = choice.sampling.params
        choice.pending_ids.append(s.token_id)
        if s.logprob is not None:
            tt, tb = self.tokenizer.token_text, self.tokenizer.token_bytes
            choice.pending_logprobs.append(TokenLogprob(
                s.token_id, tt(s.token_id), s.logprob, tuple((i, tt(i), lp) for i, lp in s.top),
                tb(s.token_id), tuple(tb(i) for i, _ in s.top),
            ))
        reason = self.scheduler.append_token(seq, s.token_id)
        # a stop token's text is never shown, but for a stop_token_ids one with include_stop_str_in_output
        if reason != "stop" or (p.include_stop_str_in_output and s.token_id in p.stop_token_ids):
            choice.text += choice.detok.push(s.token_id)
        if p.stop and len(choice.seq.output_ids) >= p.min_tokens:
            hits = [(i, len(x)) for x in p.stop if (i := choice.text.find(x, max(0, choice.emitted - len(x)))) >= 0]
            if hits:
                hit = min(i for i, _ in hits)  # the first stop string in the text, the longest starting there
                length = max(n for i, n in hits if i == hit)
                choice.text = choice.text[: hit + length] if p.include_stop_str_in_output else choice.text[:hit]
                if reason is None:
                    self.scheduler.finish(seq, "stop")
                reason = "stop"
        if reason is None and choice.sampling.grammar_done:  # a complete structured output: nothing may follow
            self.scheduler.finish(seq, "stop")
            reason = "stop"
        if reason is not None:
            return self._finish(seq, reason)
        safe = len(choice.text) - _held_back(choice.text, p.stop)
        if safe <= choice.emitted and not choice.pending_logprobs:
            return None  # nothing to say yet (held-back bytes or a possible stop string)
        return self._delta(choice, safe)

    def _delta(self, choice: _Choice, upto: int, reason: FinishReason | None = None) -> RequestOutput:
        text = choice.text[choice.emitted : upto]
        choice.emitted = max(choice.emitted, upto)
        out = RequestOutput(
            request_id=choice.request.request_id,
            index=choice.seq.index,
            text=text,
            token_ids=tuple(choice.pending_ids),
            logprobs=tuple(choice.pending_logprobs),
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=len(choice.seq.prompt_ids),
            completion_tokens=len(choice.seq.output_ids),
            cached_tokens=(choice.seq.parent or choice.seq).num_cached,  # choices 1.. copy choice 0's prompt
        )
        choice.pending_ids, choice.pending_logprobs = [], []
        return out

    def _finish(self, seq: Sequence, reason: FinishReason) -> RequestOutput:
        choice = self.choices.pop(seq)
        if reason in ("length", "abort", "error"):  # release what the detokenizer held back
            choice.text += choice.detok.flush()
            stops = choice.sampling.params.stop
            hits = [i for i in (choice.text.find(x, max(0, choice.emitted - len(x))) for x in stops) if i >= 0]
            if hits:
                choice.text = choice.text[: min(hits)]
                reason = "stop" if reason == "length" else reason
        self.scheduler.finish(seq, reason)
        return self._delta(choice, len(choice.text), reason)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string (it may still form)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best

