"""Seeds reproduce on the default model in the default configuration: the same seeded request gives the same
tokens sent again (a prefix-cache hit), whatever shares its batch, however its prompt is chunked. It used to
differ once the prefix cache computed the last prompt token through another kernel than a fresh prefill."""

import pytest

from models.loading import load_gguf
from server.engine.core import EngineConfig, EngineCore
from server.engine.types import SamplingParams
from tests.engine.conftest import request, token_ids

pytestmark = pytest.mark.timeout(600)
SEEDED = SamplingParams(max_tokens=24, temperature=0.9, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module")
def smol():
    return load_gguf(dtype="fp32")  # what `lamina serve` loads by default here: Q4_1 kept, fp32 activations


def _core(loaded, **kw):
    return EngineCore.from_config(loaded, EngineConfig(**{"max_context": 256, "max_batch": 4, "dtype": "bf16", **kw}))


def test_the_same_seeded_request_three_times_on_one_server(smol):
    assert smol.model.llama.fused is not None
    prompt = smol.tokenizer.encode("<|im_start|>user\nWrite a line about the sea.<|im_end|>\n<|im_start|>assistant\n")
    core = _core(smol)
    runs = [token_ids(core.generate_all([(request(f"r{i}", prompt, SEEDED), 0)])[f"r{i}"]) for i in range(3)]
    assert core.prompt_tokens_cached_total >= 2 * (len(prompt) - 1)  # runs 2 and 3 hit the prefix cache
    assert runs[0] == runs[1] == runs[2]
    # greedy too: streamed or not, cached or not, the same tokens
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    a = token_ids(core.generate_all([(request("g1", prompt, greedy), 0)])["g1"])
    b = token_ids(_core(smol, prefix_caching=False).generate_all([(request("g2", prompt, greedy), 0)])["g2"])
    assert a == b


def test_a_seeded_request_is_the_same_alone_batched_or_chunked(smol):
    prompt = smol.tokenizer.encode("Tell me a story about a lighthouse keeper and a storm.")
    others = [smol.tokenizer.encode(t) for t in ("A different prompt entirely.", "One more, of another length!")]
    alone = token_ids(_core(smol).generate_all([(request("a", prompt, SEEDED), 0)])["a"])
    reqs = [(request("a", prompt, SEEDED), 0)] + [
        (request(f"o{i}", p, SamplingParams(max_tokens=30, temperature=1.0, seed=i)), 0) for i, p in enumerate(others)]
    batched = token_ids(_core(smol).generate_all(reqs)["a"])
    chunked = token_ids(_core(smol, prefill_chunk=5).generate_all([(request("a", prompt, SEEDED), 0)])["a"])
    assert alone == batched == chunked


def _logprobs(outs) -> list[tuple[int, float]]:
    return [(lp.token_id, lp.logprob) for o in outs for lp in o.logprobs]


@pytest.mark.parametrize("model", ["reference", "plain"])
def test_deterministic_mode_off_the_fused_path(model):
    """--deterministic on a model the fused kernel does not run (fp32 weights, eager layers; an adapter model
    with an image, and a plain one): a seeded request's tokens *and their logprobs, to the bit* are the same
    alone, batched with others, prefilled in chunks of 3, or with its prompt from the prefix cache."""
    from server.engine.types import ImageInput
    from tests.engine.conftest import load_reference, tiny_plain

    loaded = load_reference() if model == "reference" else tiny_plain()
    assert loaded.model.llama.fused is None
    tok = loaded.tokenizer
    seeded = SamplingParams(max_tokens=10, temperature=0.9, seed=7, ignore_eos=True, logprobs=True)
    images = ()
    if model == "reference":
        images = (ImageInput(pixels=loaded.model.zero_image()[0] + 0.5, sha256="grey"),)
    prompt = tok.encode("what is in the picture, and why is it there?", bos=True)
    others = [tok.encode(t, bos=True) for t in ("another one", "a third prompt, longer than the others are")]

    def core(**kw):
        return EngineCore.from_config(loaded, EngineConfig(**{"max_context": 128, "max_batch": 4, "dtype": "fp32",
                                                              "deterministic": True, **kw}))

    def mine(rid="a"):
        return request(rid, prompt, seeded, images=images)

    alone = _logprobs(core().generate_all([(mine(), 0)])["a"])
    reqs = [(mine(), 0)] + [(request(f"o{i}", p, SamplingParams(max_tokens=12, temperature=1.0, seed=i)), 0)
                            for i, p in enumerate(others)]
    batched = _logprobs(core().generate_all(reqs)["a"])
    chunked = _logprobs(core(prefill_chunk=3).generate_all([(mine(), 0)])["a"])
    c = core()
    c.generate_all([(mine("first"), 0)])
    cached = _logprobs(c.generate_all([(mine("again"), 0)])["again"])
    assert c.prompt_tokens_cached_total >= len(prompt) - 1
    assert len(alone) == 10
    assert alone == batched == chunked == cached
