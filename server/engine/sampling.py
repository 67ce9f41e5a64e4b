"""Per-request sampling over a batch of logits: penalties, logit_bias, temperature, min_p/top_k/top_p, logprobs.

Every row is processed on its own slice with its own `torch.Generator` (seeded from the request's seed and
the choice index), and one uniform draw per token picks the token by inverse CDF, so a seeded request gives
the same text whatever else is in the batch. temperature == 0 is an exact argmax (after penalties/bias).
Logprobs are those of the model's distribution (raw logits, before penalties and temperature), as vLLM does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import cache

import torch
from torch import Tensor

from server.engine.types import SamplingParams


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float | None = None  # set when the request asked for logprobs
    top: tuple[tuple[int, float], ...] = ()  # (id, logprob) best first


@dataclass(eq=False)
class SamplingState:
    """What one choice needs between steps: its params, RNG and the token history the penalties look at."""

    params: SamplingParams
    generator: torch.Generator
    prompt_ids: frozenset[int] = frozenset()
    output_counts: Counter = field(default_factory=Counter)
    stop_ids: frozenset[int] = frozenset()  # masked until `params.min_tokens` tokens are out
    generated: int = 0
    matcher: object | None = None  # llguidance's LLMatcher of `params.grammar` (see server/engine/grammar.py)

    @staticmethod
    def create(params: SamplingParams, prompt_ids, index: int = 0, stop_ids: frozenset[int] = frozenset()
               ) -> SamplingState:
        g = torch.Generator()
        if params.seed is None:
            g.seed()  # non-deterministic
        else:
            g.manual_seed((params.seed * 1_000_003 + index) & 0xFFFF_FFFF_FFFF)  # choices differ, reproducibly
        return SamplingState(params, g, frozenset(prompt_ids), stop_ids=frozenset(stop_ids))

    def record(self, token_id: int) -> None:
        self.output_counts[token_id] += 1
        self.generated += 1
        if self.matcher is not None:
            self.matcher.consume_token(token_id)

    @property
    def grammar_done(self) -> bool:
        """The grammar is complete: nothing more may follow."""
        return self.matcher is not None and self.matcher.is_stopped()

    @property
    def holding_stops(self) -> bool:
        """Still short of min_tokens: stop tokens are masked."""
        return self.generated < self.params.min_tokens and bool(self.stop_ids)


def validate_params(p: SamplingParams, vocab_size: int) -> None:
    """Raises ValueError for parameters no sampler can honour (the HTTP layer maps it to 400)."""
    checks = [
        (p.max_tokens >= 1, "max_tokens must be at least 1"),
        (p.temperature >= 0, "temperature must be >= 0"),
        (0 < p.top_p <= 1, "top_p must be in (0, 1]"),
        (p.top_k >= 0, "top_k must be >= 0"),
        (0 <= p.min_p <= 1, "min_p must be in [0, 1]"),
        (p.repetition_penalty > 0, "repetition_penalty must be > 0"),
        (-2 <= p.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]"),
        (-2 <= p.presence_penalty <= 2, "presence_penalty must be in [-2, 2]"),
        (p.n >= 1, "n must be at least 1"),
        (p.min_tokens >= 0, "min_tokens must be >= 0"),
        (0 <= p.top_logprobs <= 20, "top_logprobs must be in [0, 20]"),
        (all(0 <= int(t) < vocab_size for t in p.logit_bias), "logit_bias has token ids outside the vocabulary"),
        (all(0 <= int(t) < vocab_size for t in p.stop_token_ids), "stop_token_ids outside the vocabulary"),
        (all(s for s in p.stop), "stop strings must not be empty"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def apply_penalties(logits: Tensor, state: SamplingState) -> Tensor:
    """logits (V,) float32 → a penalised copy: repetition (CTRL, prompt + output), frequency, presence, bias."""
    p = state.params
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = state.prompt_ids | state.output_counts.keys()
        if seen:
            ids = torch.tensor(sorted(seen))
            vals = logits[ids]
            logits[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and state.output_counts:
        ids = torch.tensor(list(state.output_counts.keys()))
        counts = torch.tensor(list(state.output_counts.values()), dtype=logits.dtype)
        logits[ids] -= counts * p.frequency_penalty + p.presence_penalty
    if p.logit_bias:
        ids = torch.tensor([int(t) for t in p.logit_bias])
        logits[ids] += torch.tensor([float(b) for b in p.logit_bias.values()], dtype=logits.dtype)
    if state.holding_stops:
        logits[torch.tensor(sorted(state.stop_ids))] = float("-inf")
    return logits


def argmax_rows(logits: Tensor) -> list[int]:
    """Each row's first maximum of (B, V) logits (a NaN counts as the maximum, as in torch and numpy). On the
    CPU through the kernels' argmax where the variant has one (AVX-512), else numpy's: torch's took 156 µs for
    a 49k-token vocabulary, numpy's 8 µs warm but 106 µs in the decode loop (1.8% of a batch-1 step: after the
    kernel has streamed the weights every Python call on the way misses the caches)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        fast = _kernel_argmax()
        if fast is not None:
            try:
                return fast(logits)  # it checks the shape and layout itself (each check here cost µs, cold)
            except RuntimeError:  # not (B, V) contiguous: numpy's
                pass
        return logits.detach().numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


@cache
def _kernel_argmax():
    from models import kernels

    module = kernels.classes()
    return getattr(module, "argmax_rows", None)


def sample_row(logits: Tensor, state: SamplingState) -> int:
    """One token from penalised logits (V,)."""
    p = state.params
    if p.temperature == 0:
        return argmax_rows(logits[None])[0]
    probs = torch.softmax(logits / p.temperature, dim=-1)  # (V,)
    if p.min_p > 0:
        probs = torch.where(probs < p.min_p * probs.max(), 0.0, probs)
    if p.top_k > 0:
        probs, order = torch.topk(probs, min(p.top_k, probs.numel()))  # sorted, best first
    elif p.top_p < 1:
        probs, order = torch.sort(probs, descending=True)
    else:
        order = None
    if p.top_p < 1:
        # the reference's rule: drop every token whose preceding cumulative mass already exceeds top_p
        probs = torch.where(probs.cumsum(0) - probs > p.top_p, 0.0, probs)
    cdf = probs.double().cumsum(0)  # (V',)
    u = torch.rand((), generator=state.generator, dtype=torch.float64) * cdf[-1]
    i = int(torch.searchsorted(cdf, u, right=True).clamp(max=cdf.numel() - 1))
    while probs[i] == 0 and i > 0:  # u landed exactly on a boundary before a dropped tail
        i -= 1
    return int(order[i]) if order is not None else i


def _plain(state: SamplingState) -> bool:
    p = state.params
    return p.repetition_penalty == 1.0 and not (p.frequency_penalty or p.presence_penalty or p.logit_bias
                                                or state.holding_stops)


def sample(logits: Tensor, states: list[SamplingState], grammars=None) -> list[Sampled]:
    """logits (B, V) float32, one state per row → one `Sampled` per row (the states record the token).
    Rows with a grammar (`grammars`: server.engine.grammar.Grammars) sample only the tokens it allows next;
    their logprobs stay the model's."""
    raw = logits
    constrained = [b for b, st in enumerate(states) if st.matcher is not None]
    if constrained:
        allowed = grammars.allowed([states[b].matcher for b in constrained])  # (n, V) bool
        logits = logits.clone()
        logits[constrained] = logits[constrained].masked_fill(~allowed, float("-inf"))
    # greedy rows without penalties: one argmax over all of them (per row: the same first maximum), not one
    # torch call and host sync per row
    greedy = [b for b, st in enumerate(states) if st.params.temperature == 0 and _plain(st)]
    rows = logits if len(greedy) == len(states) else logits[greedy]
    picked = dict(zip(greedy, argmax_rows(rows) if greedy else (), strict=True))
    out = []
    for b, state in enumerate(states):
        p = state.params
        row = logits[b]
        token = picked.get(b)
        if token is None:
            token = sample_row(row if _plain(state) else apply_penalties(row, state), state)
        state.record(token)
        if p.logprobs or p.top_logprobs:
            logp = torch.log_softmax(raw[b], dim=-1)
            top = ()
            if p.top_logprobs:
                vals, ids = torch.topk(logp, p.top_logprobs)
                top = tuple(zip(ids.tolist(), vals.tolist(), strict=True))
            out.append(Sampled(token, float(logp[token]), top))
        else:
            out.append(Sampled(token))
    return out
