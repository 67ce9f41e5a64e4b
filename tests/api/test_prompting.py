"""Prompt building: the reference's Alpaca prompt for one user turn, flattened multi-turn, the model's own
chat template with image findings, and findings fitted into the context."""

from __future__ import annotations

import pytest

from models.prompts import format_alpaca
from server.api.errors import APIError
from server.api.prompting import PromptBuilder, describe_findings, parse_messages
from server.api.schemas import ChatMessage

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nDefault<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class CharTokenizer:
    bos_id, eos_id, vocab_size, add_bos = None, 0, 256, False

    def encode(self, text, bos=False):
        return list(text.encode())


def msgs(*items):
    return [ChatMessage(**m) for m in items]


def img(url="data:image/png;base64,AAAA"):
    return {"type": "image_url", "image_url": {"url": url}}


def test_alpaca_single_turn_is_the_reference():
    b = PromptBuilder("alpaca", None, CharTokenizer(), 2048)
    chat = parse_messages(msgs({"role": "user", "content": [{"type": "text", "text": "describe the image"}, img()]}))
    assert chat.image_urls == ("data:image/png;base64,AAAA",) and chat.question == "describe the image"
    assert b.render(chat, None) == format_alpaca("describe the image")
    assert b.render(chat, "Caption: a dog.") == format_alpaca("describe the image", input="Caption: a dog.")


def test_alpaca_multi_turn_is_flattened():
    b = PromptBuilder("alpaca", None, CharTokenizer(), 2048)
    chat = parse_messages(msgs({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And now?"}))
    text = b.render(chat, "Caption: a dog.")
    assert text == format_alpaca("And now?", input="Be brief.\n\nConversation so far:\nUser: Hi\nAssistant: Hello!"
                                                    "\n\nCaption: a dog.")


def test_an_assistant_message_last_is_continued():
    """vLLM's continue_final_message: the prompt ends inside the assistant's message (no end of turn, no new
    assistant header), so the model goes on from its last word; an empty one is a fresh reply."""
    convo = ({"role": "user", "content": "Name three colours."}, {"role": "assistant", "content": "Red, green and"})
    chat = parse_messages(msgs(*convo))
    assert chat.continue_final and chat.question == "Name three colours."
    b = PromptBuilder("chat", SMOL_TEMPLATE, CharTokenizer(), 2048)
    assert b.render(chat, None) == ("<|im_start|>system\nDefault<|im_end|>\n<|im_start|>user\nName three colours."
                                    "<|im_end|>\n<|im_start|>assistant\nRed, green and")
    empty = parse_messages(msgs(convo[0], {"role": "assistant", "content": ""}))
    assert b.render(empty, None) == b.render(parse_messages(msgs(convo[0])), None)
    alpaca = PromptBuilder("alpaca", None, CharTokenizer(), 2048)
    assert alpaca.render(chat, "Caption: a dog.") == format_alpaca("Name three colours.", input="Caption: a dog.") \
        + "Red, green and"
    with pytest.raises(APIError):  # no user message at all: still refused
        parse_messages(msgs({"role": "assistant", "content": "Hello"}))


def test_chat_template_with_findings():
    b = PromptBuilder("chat", SMOL_TEMPLATE, CharTokenizer(), 2048)
    chat = parse_messages(msgs({"role": "user", "content": [{"type": "text", "text": "What is it?"}, img()]}))
    assert b.render(chat, None) == ("<|im_start|>system\nDefault<|im_end|>\n<|im_start|>user\nWhat is it?<|im_end|>\n"
                                    "<|im_start|>assistant\n")
    text = b.render(chat, "Caption: a dog.")
    assert "<|im_start|>system\nYou are a helpful assistant. You cannot see images" in text
    assert "<|im_start|>user\nImage analysis:\nCaption: a dog.\n\nQuestion: What is it?<|im_end|>" in text
    with_system = parse_messages(msgs({"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": [{"type": "text", "text": "What?"}, img()]}))
    text = b.render(with_system, "Caption: a dog.")
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou cannot see images")


def test_findings_fit_the_budget():
    b = PromptBuilder("alpaca", None, CharTokenizer(), 2048)
    chat = parse_messages(msgs({"role": "user", "content": "q"}))
    long = "word " * 500
    fitted = b.fit_findings(chat, long, budget=100, prompt_budget=10_000)
    assert len(fitted.encode()) <= 100 and fitted.endswith("[…truncated]")
    base = len(b.encode(b.render(chat, "")))
    fitted = b.fit_findings(chat, long, budget=1000, prompt_budget=base + 50)
    assert len(b.encode(b.render(chat, fitted))) <= base + 50
    assert b.fit_findings(chat, "short", 100, 10_000) == "short"


def test_describe_findings():
    assert describe_findings(["Caption: a dog."], 1) == "Caption: a dog."
    assert "nothing" in describe_findings([""], 1)
    assert describe_findings(["A", ""], 2).startswith("Image 1:\nA\n\nImage 2:\n")
