"""Structured outputs: a grammar per request (JSON schema, any JSON object, regex, a choice of strings, a Lark or
GBNF grammar), compiled by llguidance against the model's vocabulary. Each step, every constrained row gets the
mask of the tokens its grammar allows next, applied to that row's logits inside the batched sampler, so
constrained and free requests share a batch. A choice ends when its grammar is complete (or, where the grammar
allows it, at the end-of-sequence token).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import torch
from torch import Tensor

from server.engine.types import GrammarSpec

log = logging.getLogger("lamina.engine")
_BITS = None  # (32,) int32: 1 << i, for unpacking the masks


def _bits() -> Tensor:
    global _BITS
    if _BITS is None:
        _BITS = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32)
    return _BITS


class Grammars:
    """The model's vocabulary as llguidance sees it (built once, on first use: 0.56 s for SmolLM2's 49,152
    tokens) and the matchers made from it. A grammar is compiled once: the request's validation on the event
    loop and its choices on the engine thread get copies of one compiled matcher (and so do repeats of a
    schema, kept in a small LRU)."""

    CACHED = 64  # compiled grammars kept

    def __init__(self, tokenizer, vocab_size: int, eos_ids: frozenset[int]):
        self.tokenizer, self.vocab_size, self.eos_ids = tokenizer, vocab_size, eos_ids
        self._ll = None
        self._lock = threading.Lock()
        self._executor = None
        self._compiled: OrderedDict[GrammarSpec, object] = OrderedDict()

    def _lltok(self):
        with self._lock:
            if self._ll is None:
                import llguidance

                tok = self.tokenizer
                eos = sorted(self.eos_ids) or [tok.eos_id]
                hf = getattr(tok, "tok", None)  # a byte-level BPE tokenizer (HF tokenizers): llguidance reads it whole
                if hf is not None and hasattr(hf, "to_str"):
                    self._ll = llguidance.LLTokenizer(hf.to_str(), n_vocab=self.vocab_size, eos_token=eos)
                else:
                    wrapped = llguidance.TokenizerWrapper(_Vocabulary(tok, self.vocab_size, eos[0]))
                    self._ll = llguidance.LLTokenizer(wrapped, n_vocab=self.vocab_size, eos_token=eos)
                self._executor = llguidance.LLExecutor()
            return self._ll

    @staticmethod
    def source(spec: GrammarSpec) -> str:
        """The llguidance grammar of a spec; ValueError for one it cannot read."""
        import llguidance

        kind = "json_schema" if spec.kind == "json_object" else spec.kind
        text = spec.schema if kind == "json_schema" else spec.value
        try:
            return llguidance.grammar_from(kind, text)
        except Exception as e:  # noqa: BLE001 - the grammar library's own message is what the client needs
            raise ValueError(f"invalid {spec.kind}: {e}") from None

    def validate(self, spec: GrammarSpec) -> None:
        """ValueError (a 400) for a grammar that does not compile: the very matcher the engine would make."""
        self.matcher(spec)

    def matcher(self, spec: GrammarSpec):
        """A fresh matcher at the grammar's start; ValueError for one that does not compile."""
        import llguidance

        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is not None:
                self._compiled.move_to_end(spec)
                return compiled.deep_copy()
        compiled = llguidance.LLMatcher(self._lltok(), self.source(spec))
        if compiled.is_error():
            raise ValueError(f"invalid {spec.kind}: {compiled.get_error()}")
        with self._lock:
            self._compiled[spec] = compiled
            if len(self._compiled) > self.CACHED:
                self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def allowed(self, matchers: list) -> Tensor:
        """(n, vocab) bool: the tokens each matcher allows next (computed in parallel by llguidance). A grammar
        that needs what no token of this vocabulary holds (a tiny vocabulary without '-', say) allows nothing:
        then the end-of-sequence tokens, so the choice ends there instead of breaking the grammar."""
        import llguidance.torch as llt

        words = (self.vocab_size + 31) // 32
        mask = torch.zeros((len(matchers), words), dtype=torch.int32)
        llt.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], mask)
        allowed = ((mask[:, :, None] & _bits()) != 0).view(len(matchers), -1)[:, : self.vocab_size]
        dead = ~allowed.any(-1)
        if dead.any():
            log.warning("structured output: the grammar allows no token of this vocabulary here; ending the choice")
            allowed[dead, sorted(self.eos_ids) or [self.tokenizer.eos_id]] = True
        return allowed


class _Vocabulary:
    """A SentencePiece tokenizer as llguidance's TokenizerWrapper reads it: every token's bytes, the special
    ones marked (they never match grammar text), and a tokenizer of byte strings.

    That tokenizer is a greedy longest match over the token bytes, not SentencePiece's own encode: encode
    puts its dummy-prefix space in front of every string (":" → "▁" ":"), which made the grammar's forced
    bytes come out as a space. llguidance only needs *a* tokenization of the bytes it forces."""

    def __init__(self, tok, vocab_size: int, eos: int):
        self.eos_token_id = eos
        self.bos_token_id = tok.bos_id
        self.tokens = [tok.token_bytes(i) for i in range(vocab_size)]
        sp = getattr(tok, "sp", None)
        self.special_token_ids = [i for i in range(vocab_size) if sp is not None and (sp.is_control(i) or sp.is_unknown(i))]
        special = set(self.special_token_ids)
        self._ids: dict[bytes, int] = {}
        for i, b in enumerate(self.tokens):
            if b and i not in special:
                self._ids.setdefault(b, i)
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, s) -> list[int]:
        data = s if isinstance(s, bytes) else s.encode("utf-8")
        out, at = [], 0
        while at < len(data):
            for n in range(min(self._longest, len(data) - at), 0, -1):
                i = self._ids.get(data[at : at + n])
                if i is not None:
                    out.append(i)
                    at += n
                    break
            else:  # a byte no token holds
                at += 1
        return out
