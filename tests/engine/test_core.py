"""The engine core on a tiny random Llama: batching invariants, sampling, stops, n > 1, logprobs."""

import torch

from server.engine.types import SamplingParams

from .conftest import GREEDY, make_core, request, run, text, token_ids

PROMPTS = [[1, 5, 9, 22, 40, 7, 3, 60, 61], [1, 70], [1, 33, 34, 35, 90, 91, 92, 93, 94, 95, 96, 12, 13, 14, 15, 16,
           17, 18, 19, 20, 21, 44], [1, 100, 101, 102]]


def test_batched_greedy_equals_sequential(plain):
    alone = [token_ids(run(plain, [request("r", p)], max_batch=1, prefill_chunk=64)["r"]) for p in PROMPTS]
    together = run(plain, [request(f"r{i}", p) for i, p in enumerate(PROMPTS)], prefill_chunk=5)
    assert [token_ids(together[f"r{i}"]) for i in range(len(PROMPTS))] == alone
    assert len({tuple(a) for a in alone}) > 1  # the rows really differ


def test_greedy_matches_uncached_forward(plain):
    ids = list(PROMPTS[0])
    out = token_ids(run(plain, [request("r", ids)])["r"])
    for t in out:
        with torch.inference_mode():
            logits = plain.model.llama(torch.tensor([ids]), torch.arange(len(ids))[None])
        assert int(logits.argmax(-1)) == t
        ids.append(t)


def test_staggered_arrivals_equal_sequential(plain):
    """Requests joining a running batch (continuous batching) decode exactly as they do alone."""
    alone = [token_ids(run(plain, [request("r", p)], max_batch=1)["r"]) for p in PROMPTS]
    core = make_core(plain, max_batch=3, prefill_chunk=4)
    outs = {f"r{i}": [] for i in range(len(PROMPTS))}
    pending = [request(f"r{i}", p) for i, p in enumerate(PROMPTS)]
    while pending or core.has_work():
        if pending:
            core.add_request(pending.pop(0), 0)
        for o in core.step():
            outs[o.request_id].append(o)
    assert [token_ids(outs[f"r{i}"]) for i in range(len(PROMPTS))] == alone


def test_seed_reproducible_under_different_batch_mixes(plain):
    p = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = token_ids(run(plain, [request("s", PROMPTS[0], p)])["s"])
    others = [request(f"o{i}", q, SamplingParams(max_tokens=5, temperature=0.8)) for i, q in enumerate(PROMPTS)]
    mixed = run(plain, [*others[:2], request("s", PROMPTS[0], p), *others[2:]], prefill_chunk=7)
    assert token_ids(mixed["s"]) == alone
    other_seed = token_ids(run(plain, [request("s", PROMPTS[0], SamplingParams(
        max_tokens=12, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True))])["s"])
    assert other_seed != alone


def test_stop_string_across_token_boundary(plain):
    tok = plain.tokenizer
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    outs = run(plain, [request("r", PROMPTS[1], params)])["r"]
    ids, full = token_ids(outs), text(outs)
    # find a 3-character window whose characters come from two different tokens
    ends = [len(tok.decode(ids[: i + 1])) for i in range(len(ids))]
    cut = next(e for e in ends if 2 <= e < len(full) - 2 and full[e - 1 : e + 2].strip() == full[e - 1 : e + 2])
    stop = full[cut - 1 : cut + 2]
    stopped = run(plain, [request("r", PROMPTS[1], SamplingParams(
        max_tokens=20, temperature=0, ignore_eos=True, stop=(stop,)))])["r"]
    assert text(stopped) == full[: full.index(stop)]
    assert stopped[-1].finish_reason == "stop" and stopped[-1].finished
    assert all(stop not in o.text for o in stopped)


def test_stop_token_ids_and_eos(plain):
    outs = run(plain, [request("r", PROMPTS[0])])["r"]
    first = token_ids(outs)[2]
    stopped = run(plain, [request("r", PROMPTS[0], SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True, stop_token_ids=(first,)))])["r"]
    assert token_ids(stopped) == token_ids(outs)[: token_ids(outs).index(first) + 1]
    assert stopped[-1].finish_reason == "stop"
    assert outs[-1].finish_reason == "length" and outs[-1].completion_tokens == 8


def test_n_choices_and_logprobs(plain):
    params = SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=7, logprobs=True, top_logprobs=3,
                            ignore_eos=True)
    outs = run(plain, [request("r", PROMPTS[0], params)])["r"]
    choices = [token_ids(outs, i) for i in range(3)]
    assert all(len(c) == 6 for c in choices) and len({tuple(c) for c in choices}) > 1
    assert sum(o.finished for o in outs) == 3
    lps = [lp for o in outs if o.index == 0 for lp in o.logprobs]
    assert [lp.token_id for lp in lps] == choices[0]
    for lp in lps:
        assert len(lp.top) == 3 and lp.top[0][2] >= lp.top[1][2] >= lp.top[2][2]
        assert lp.logprob <= lp.top[0][2] + 1e-6
    # greedy logprobs: the chosen token is the best one
    g = run(plain, [request("g", PROMPTS[0], SamplingParams(max_tokens=3, temperature=0, logprobs=True,
                                                          top_logprobs=1))])["g"]
    for lp in (lp for o in g for lp in o.logprobs):
        assert lp.token_id == lp.top[0][0] and abs(lp.logprob - lp.top[0][2]) < 1e-6


def test_logit_bias_and_penalties(plain):
    forced = run(plain, [request("r", PROMPTS[0], SamplingParams(
        max_tokens=4, temperature=0.7, seed=1, logit_bias={42: 100.0}, ignore_eos=True))])["r"]
    assert token_ids(forced) == [42] * 4
    rep = run(plain, [request("r", PROMPTS[0], SamplingParams(
        max_tokens=6, temperature=0, presence_penalty=2.0, frequency_penalty=2.0, logit_bias={42: 10.0},
        ignore_eos=True))])["r"]
    assert token_ids(rep)[0] == 42 and token_ids(rep).count(42) < 6


def test_incremental_text_equals_decode(plain):
    outs = run(plain, [request("r", PROMPTS[2], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))])["r"]
    assert text(outs) == plain.tokenizer.decode(token_ids(outs))
    assert outs[-1].prompt_tokens == len(PROMPTS[2]) and outs[-1].completion_tokens == 16


def test_context_fills_with_length(plain):
    outs = run(plain, [request("r", PROMPTS[2], GREEDY)], max_context=26)["r"]
    assert outs[-1].finish_reason == "length" and len(token_ids(outs)) == 4


def test_n_choices_prefill_the_prompt_once(plain):
    """Choices 1.. copy choice 0's prompt K/V and prefill only the last prompt token; greedy choices then equal
    the single-choice answer, and seeded choices are the same whatever else shares the batch."""
    prompt = PROMPTS[2]  # 22 tokens, prefilled in chunks of 5
    core = make_core(plain, prefill_chunk=5)
    outs = core.generate_all([(request("g", prompt, SamplingParams(max_tokens=6, temperature=0, n=3,
                                                                   ignore_eos=True)), 0)])["g"]
    assert core.prompt_tokens_total == len(prompt) + 2  # once, plus the last token for each other choice
    single = token_ids(run(plain, [request("one", prompt)])["one"])[:6]
    assert [token_ids(outs, i) for i in range(3)] == [single] * 3
    seeded = SamplingParams(max_tokens=6, temperature=1.0, n=3, seed=3, ignore_eos=True)
    alone = run(plain, [request("s", prompt, seeded)], prefill_chunk=5)["s"]
    mixed = run(plain, [request("x", PROMPTS[0]), request("s", prompt, seeded), request("y", PROMPTS[1])],
                prefill_chunk=5)["s"]
    assert [token_ids(alone, i) for i in range(3)] == [token_ids(mixed, i) for i in range(3)]


def test_min_tokens_holds_back_stop_tokens_and_strings(plain):
    """vLLM's min_tokens: no stop token is sampled and no stop string ends the choice before it."""
    prompt = PROMPTS[0]
    free = token_ids(run(plain, [request("f", prompt)])["f"])
    stop_first = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(free[0],), ignore_eos=True)
    assert token_ids(run(plain, [request("s", prompt, stop_first)])["s"]) == [free[0]]  # stops at once
    held = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(free[0],), ignore_eos=True, min_tokens=4)
    outs = run(plain, [request("m", prompt, held)])["m"]
    ids = token_ids(outs)
    assert len(ids) >= 4 and free[0] not in ids[:4]
    assert outs[-1].finish_reason in ("stop", "length")
    text = plain.tokenizer.decode(free)
    stop_str = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, stop=(text[:1],), min_tokens=3)
    assert len(token_ids(run(plain, [request("t", prompt, stop_str)])["t"])) >= 3
