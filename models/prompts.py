"""Prompt formats: the reference's Alpaca templates and a model's own jinja chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)


def format_alpaca(instruction: str, input: str | None = None) -> str:
    """The reference's `format_prompt`: the "with input" template when an input is given."""
    if input is None:
        return ALPACA_NO_INPUT.format(instruction=instruction)
    return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)


def _raise(message: str) -> None:
    raise ValueError(message)


class ChatTemplate:
    """A HF-style jinja chat template (as stored in GGUF `tokenizer.chat_template`), rendered sandboxed."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(source)
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.takes_tools = "tools" in source  # HF templates that render a `tools` list (Qwen, Hermes, Llama 3.1)

    def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any) -> str:
        return self.template.render(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **extra,
        )
