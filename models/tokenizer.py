"""Tokenizers behind one small interface, and incremental UTF-8-safe detokenisation.

- `SentencePieceTokenizer`: LLaMA's `tokenizer.model` through the real SentencePiece library (the reference
  encodes prompts with BOS, no EOS).
- `BPETokenizer`: a byte-level BPE vocabulary (as embedded in a GGUF file) through HF `tokenizers`, with
  the model's control tokens (`<|im_start|>`, ...) recognised in text.
- `IncrementalDetokenizer`: turns a growing id list into text deltas that never split a UTF-8 character
  or a SentencePiece word boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Protocol

import sentencepiece as spm
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int
    vocab_size: int

    def encode(self, text: str, bos: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


class SentencePieceTokenizer:
    def __init__(self, model_file: str):
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.vocab_size = self.sp.vocab_size()
        self.stop_ids = frozenset({self.eos_id})

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def token_text(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id)).replace("\u2581", " ")

    def token_bytes(self, token_id: int) -> bytes:
        """The token's raw bytes: a byte-fallback piece <0xE2> is the one byte 0xE2, not its name."""
        token_id = int(token_id)
        if self.sp.is_byte(token_id):
            return bytes([int(self.sp.id_to_piece(token_id)[3:5], 16)])
        return self.token_text(token_id).encode("utf-8")


# GPT-2's pre-tokenisation pattern; SmolLM ("smollm" in GGUF) splits every digit first.
_GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


@cache
def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, inverted: the character each byte is written as in the vocabulary."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


class BPETokenizer:
    CONTROL = 3  # GGUF token type of control tokens (<|im_start|>, <|endoftext|>, ...)

    def __init__(
        self,
        tokens: list[str],
        merges: list[str],
        token_types: list[int],
        bos_id: int | None,
        eos_id: int,
        add_bos: bool,
        split_digits: bool,
    ):
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        split = [pre_tokenizers.Split(Regex(_GPT2_PATTERN), behavior="isolated")]
        if split_digits:
            split.insert(0, pre_tokenizers.Digits(individual_digits=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [*split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        control = [tokens[i] for i, t in enumerate(token_types) if t == self.CONTROL]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        self.tok = tok
        self.tokens = tokens
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.add_bos = add_bos
        self.vocab_size = len(tokens)
        self.control_ids = frozenset(vocab[t] for t in control)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_text(self, token_id: int) -> str:
        return self.tok.decode([int(token_id)], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The token's raw bytes (byte-level BPE: each character of the vocabulary entry stands for one byte,
        so a token holding half of a UTF-8 character gives that half, not U+FFFD)."""
        token_id = int(token_id)
        if token_id in self.control_ids:
            return self.tokens[token_id].encode("utf-8")
        table = _unicode_to_byte()
        return bytes(table[c] for c in self.tokens[token_id])


class IncrementalDetokenizer:
    """Emits text deltas for a growing list of ids (vLLM/TGI's prefix-offset method).

    Decoding a window that starts a few tokens back keeps SentencePiece's leading-space handling right,
    and holding back text that ends in U+FFFD keeps multi-byte characters whole.
    """

    def __init__(self, tokenizer: Tokenizer, window: int = 6):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.window = window
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.read_offset = len(self.ids)
            self.prefix_offset = max(0, self.read_offset - self.window)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back (e.g. an incomplete character at the very end)."""
        full = self.tokenizer.decode(self.ids)
        delta = full[len(self.text) :] if full.startswith(self.text) else ""
        self.text += delta
        self.read_offset = len(self.ids)
        return delta
