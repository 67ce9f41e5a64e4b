"""The default model (SmolLM2-135M-Instruct from its GGUF) through our loader and model file."""

import pytest
import torch

from models.loading import default_gguf_path, load_gguf, read_gguf
from models.prompts import ChatTemplate
from models.tokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello world! 12345 numbers",
    "  leading spaces\n\nnewlines\ttabs",
    "<|im_start|>user\nWhat's up?<|im_end|>",
    "Ünïcödé 日本語 🙂 emoji",
    "don't I'll we've",
]


@pytest.fixture(scope="module")
def smol():
    return load_gguf(dtype="fp32", max_seq_len=512, quantization="none")  # exact math: dequantized weights


def _to_hf_layout(w, n_heads):
    """Interleaved-pair (Meta/GGUF) RoPE rows → HF rotate-half rows."""
    out_dim, dim = w.shape
    hd = out_dim // n_heads
    return w.view(n_heads, hd // 2, 2, dim).transpose(1, 2).reshape(out_dim, dim)


def test_same_logits_as_hf_transformers(smol):
    from transformers import LlamaConfig, LlamaForCausalLM

    args, state, _, _ = read_gguf(default_gguf_path())
    cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden,
                      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                      num_key_value_heads=args.kv_heads, rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                      max_position_embeddings=2048, tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    hf_sd = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
             "attention.wo": "self_attn.o_proj", "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
             "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for i in range(args.n_layers):
        for ours, theirs in names.items():
            w = state[f"layers.{i}.{ours}.weight"]
            if ours == "attention.wq":
                w = _to_hf_layout(w, args.n_heads)
            elif ours == "attention.wk":
                w = _to_hf_layout(w, args.kv_heads)
            hf_sd[f"model.layers.{i}.{theirs}.weight"] = w
    hf_sd["lm_head.weight"] = state["tok_embeddings.weight"]
    hf = LlamaForCausalLM(cfg).eval()
    hf.load_state_dict(hf_sd, strict=True)

    ids = smol.tokenizer.encode("The capital of France is Paris, and the capital of Italy is")
    with torch.inference_mode():
        want = hf(torch.tensor([ids])).logits[0]
        got = smol.model.llama(torch.tensor([ids]), torch.arange(len(ids))[None], last_only=False)[0]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


def test_tokenizer_matches_hf(smol):
    from transformers import AutoTokenizer

    path = default_gguf_path()
    hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        assert smol.tokenizer.encode(text) == hf.encode(text, add_special_tokens=False), text


def test_chat_template_and_greedy_answer(smol):
    """A question the model answers with a clear margin (> 2 logits at every early token, also when kept in
    Q4_1): "capital of France" starts with a near tie that quantization flips."""
    text = ChatTemplate(smol.chat_template).render([{"role": "user", "content": "What is the capital of Japan?"}])
    assert text.endswith("<|im_start|>user\nWhat is the capital of Japan?<|im_end|>\n<|im_start|>assistant\n")
    ids = smol.tokenizer.encode(text)
    assert ids[0] == 1 and smol.tokenizer.token_text(ids[0]) == "<|im_start|>"  # control tokens parsed
    out = []
    with torch.inference_mode():
        for _ in range(12):
            seq = ids + out
            nxt = int(smol.model.llama(torch.tensor([seq]), torch.arange(len(seq))[None]).argmax(-1))
            if nxt in smol.stop_ids:
                break
            out.append(nxt)
    assert "Tokyo" in smol.tokenizer.decode(out)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_is_utf8_safe(smol, text):
    detok = IncrementalDetokenizer(smol.tokenizer)
    pieces = [detok.push(i) for i in smol.tokenizer.encode(text)]
    pieces.append(detok.flush())
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == smol.tokenizer.decode(smol.tokenizer.encode(text))


def test_token_bytes_are_the_raw_bytes(smol):
    """logprobs' `bytes`: a token holding part of a UTF-8 character gives those bytes, not U+FFFD's."""
    text = "naïve → café ✓"
    ids = smol.tokenizer.encode(text)
    assert b"".join(smol.tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")
    partial = [i for i in ids if smol.tokenizer.token_text(i).endswith("\ufffd")]
    assert partial and all(b"\xef\xbf\xbd" not in smol.tokenizer.token_bytes(i) for i in partial)


def test_our_gguf_reader_reads_what_ggufs_own_reader_reads():
    """Loading parses the GGUF through gguf's reader over plain ndarray views of the map (a fraction of the
    memory and time): every metadata value and every tensor's bytes must be the library's own."""
    import numpy as np
    from gguf import GGUFReader

    from models.loading import _gguf_reader

    path = default_gguf_path()
    ours, theirs = _gguf_reader(path), GGUFReader(str(path))
    assert type(ours.data) is np.ndarray and type(ours.tensors[0].data) is np.ndarray
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        assert ours.fields[key].types == field.types, key
        assert ours.fields[key].contents() == field.contents(), key
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.tensor_type, list(a.shape), a.data_offset) == (b.name, b.tensor_type, list(b.shape), b.data_offset)
        assert np.array_equal(a.data, b.data), a.name
