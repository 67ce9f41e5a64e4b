"""Tool calling: the request's tools → the prompt's tool section, a grammar that makes every call valid against its
function's JSON schema, and a parser that turns the model's text into OpenAI tool calls (whole or streamed).

The call format (what the model is told and what the grammar allows) is Hermes / Qwen's, the one most
open chat models with tools were trained on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Models whose chat template takes `tools` (Qwen 2.5/3, Hermes, …) get the tools through their template; the others
(SmolLM2, Alpaca LLaMA-Adapter models, which were never trained on tools) get the generic section of
`ToolSet.instructions` in their system text. Either way the output is constrained:
- tool_choice "required" / a named function: one call (several with parallel_tool_calls), nothing else;
- "auto": either a text answer (anything that does not start with "<tool_call>") or calls;
- "none": no constraint and no tools in the prompt.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from server.engine.types import GrammarSpec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: str  # the JSON schema, as JSON

    def openai(self) -> dict:
        fn = {"name": self.name, **({"description": self.description} if self.description else {}),
              "parameters": json.loads(self.parameters)}
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def text(self) -> str:
        """The call as the model writes it (for the history of a conversation)."""
        try:
            args = json.dumps(json.loads(self.arguments or "{}"), ensure_ascii=False)
        except ValueError:
            args = self.arguments
        return f'{OPEN}\n{{"name": {json.dumps(self.name, ensure_ascii=False)}, "arguments": {args}}}\n{CLOSE}'


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolSet:
    tools: tuple[Tool, ...]
    choice: str = "auto"  # none | auto | required | function (the one named)
    named: str | None = None
    parallel: bool = True
    answer: GrammarSpec | None = None  # with "auto": a json_schema / json_object the text answer must follow

    @property
    def active(self) -> bool:
        return self.choice != "none" and bool(self.tools)

    def instructions(self) -> str:
        """The generic tool section of the system text (models whose template does not take tools)."""
        listed = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in self.offered())
        rule = {"required": "You must call at least one function.",
                "function": f"You must call the function {self.named}."}.get(self.choice, "")
        many = "one or more functions" if self.parallel else "a function"
        return (f"# Tools\n\nYou may call {many} to help with the user's request. {rule}".rstrip() +
                "\n\nThe functions, as JSON signatures, inside <tools></tools>:\n"
                f"<tools>\n{listed}\n</tools>\n\n"
                "To call a function, reply with a JSON object holding its name and arguments inside "
                "<tool_call></tool_call> tags:\n"
                f'{OPEN}\n{{"name": <function-name>, "arguments": <arguments-json-object>}}\n{CLOSE}')

    def offered(self) -> tuple[Tool, ...]:
        return tuple(t for t in self.tools if self.choice != "function" or t.name == self.named)

    def grammar(self) -> GrammarSpec | None:
        """A Lark grammar (llguidance) for the reply: every call's arguments valid against the function's schema."""
        if not self.active:
            return None
        fns = self.offered()
        rules = [f"fn{i}: %json {json.dumps(_call_schema(t))}" for i, t in enumerate(fns)]
        call = 'call: "<tool_call>\\n" (' + " | ".join(f"fn{i}" for i in range(len(fns))) + ') "\\n</tool_call>"'
        calls = 'calls: call ("\\n" call)*' if self.parallel else "calls: call"
        if self.choice != "auto":
            start = "start: calls"
        elif self.answer is not None:
            start, rules = "start: answer | calls", [*rules, f"answer: %json {self.answer.schema}"]
        else:
            start, rules = "start: TEXT | calls", [*rules, f"TEXT: /({_not_prefix(OPEN)})(.|\\n)*/"]
        return GrammarSpec("grammar", "\n".join([start, calls, call, *rules]) + "\n")

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The reply's text before any call, and its calls."""
        stream = ToolStream()
        events = stream.feed(text) + stream.finish()
        content = "".join(e[1] for e in events if e[0] == "content")
        calls = stream.calls
        return content, calls


def _call_schema(tool: Tool) -> dict:
    return {"type": "object", "properties": {"name": {"const": tool.name}, "arguments": json.loads(tool.parameters)},
            "required": ["name", "arguments"], "additionalProperties": False}


def _not_prefix(word: str) -> str:
    """A regex (Rust syntax) for the strings that do not start with `word` (and are not empty)."""
    return "|".join(re.escape(word[:i]).replace("\\<", "<").replace("\\>", ">") + f"[^{word[i]}]"
                    for i in range(len(word)))


def _held(text: str, word: str) -> int:
    """How many characters at the end of `text` could be the start of `word`."""
    for n in range(min(len(word) - 1, len(text)), 0, -1):
        if word.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ToolStream:
    """Incremental parse of a reply: ("content", text), ("call", index, id, name) and ("arguments", index, text)
    events, never splitting a tag. Arguments stream as the model writes them; the object around them and the
    tags are held back until they are certain."""

    calls: list[ToolCall] = field(default_factory=list)
    _buf: str = ""
    _in_call: bool = False
    _header: tuple[str, str] | None = None  # (id, name) of the call being read
    _sent: int = 0  # characters of the current call's arguments already sent

    def feed(self, text: str) -> list[tuple]:
        self._buf += text
        events: list[tuple] = []
        while True:
            if not self._in_call:
                at = self._buf.find(OPEN)
                if at < 0:
                    keep = _held(self._buf, OPEN)
                    out, self._buf = self._buf[: len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                    if self.calls:  # what separates calls is not content
                        out = out.lstrip()
                    if out:
                        events.append(("content", out))
                    return events
                before = self._buf[:at]
                if before and not (self.calls and not before.strip()):
                    events.append(("content", before))
                self._buf, self._in_call, self._header, self._sent = self._buf[at + len(OPEN):], True, None, 0
            if self._header is None:
                m = _HEADER.match(self._buf)
                if m is None:
                    if CLOSE in self._buf:  # not a call we can read: keep it as text
                        at = self._buf.index(CLOSE) + len(CLOSE)
                        events.append(("content", OPEN + self._buf[:at]))
                        self._buf, self._in_call = self._buf[at:], False
                        continue
                    return events
                name = json.loads(f'"{m.group(1)}"')
                self._header = (new_call_id(), name)
                self._buf = self._buf[m.end():]
                events.append(("call", len(self.calls), self._header[0], name))
            end = self._buf.find(CLOSE)
            args = self._buf if end < 0 else self._buf[:end]
            # the object's closing brace and the tag are not arguments: hold back a tail that may be them
            body = args.rstrip()
            if end >= 0:
                body = body[:-1].rstrip() if body.endswith("}") else body
            else:
                tail = len(args) - _held(args, CLOSE)
                body = args[:tail].rstrip()
                body = body[:-1] if body.endswith("}") else body
            if len(body) > self._sent:
                events.append(("arguments", len(self.calls), body[self._sent:]))
                self._sent = len(body)
            if end < 0:
                return events
            self.calls.append(ToolCall(self._header[0], self._header[1], body[: self._sent].strip()))
            self._buf, self._in_call = self._buf[end + len(CLOSE):], False

    def finish(self) -> list[tuple]:
        """What is left when the reply ends (at max_tokens, say): held-back text, a call cut short."""
        events: list[tuple] = []
        if self._in_call and self._header is not None:
            rest = self._buf.rstrip()
            if len(rest) > self._sent:
                events.append(("arguments", len(self.calls), rest[self._sent:]))
            self.calls.append(ToolCall(self._header[0], self._header[1], rest))
        elif self._in_call:
            events.append(("content", OPEN + self._buf))
        elif self._buf:
            events.append(("content", self._buf))
        self._buf, self._in_call = "", False
        return events


def history_text(text: str, calls: Sequence[ToolCall]) -> str:
    """An assistant turn with tool calls, as the model writes it (templates without tools, Alpaca)."""
    return "\n".join([text, *(c.text() for c in calls)] if text else [c.text() for c in calls])
