"""Chat messages (+ expert findings) → the prompt text and token ids a model was trained on.

- LLaMA-Adapter ("alpaca"): one user message is exactly the reference's `format_alpaca(text)`, or
  `format_alpaca(text, input=findings)` when experts reported something. Multi-turn chats are not what the
  checkpoints were trained on; they are flattened: the last user message is the instruction and the system
  text, the earlier turns ("User: …" / "Assistant: …") and the findings go to the `### Input:` section.
- An assistant message last is continued (vLLM's `continue_final_message`): the prompt ends with that message's
  text, not with an end of turn, and the completion is what comes after it. Alpaca: the text follows
  "### Response:" as a training example's output does.
- Chat models ("chat"): the model's own jinja template. The findings are put in front of the (last) user
  message that carried the images ("Image analysis: … Question: …") and a system sentence says where they
  come from: of the layouts we tried, the one the default 135M model grounds its answers in best.

Tools (server/api/tools.py): a chat template that takes `tools` gets them, with the history's tool calls and
`tool` messages as HF templates expect them; otherwise (and for Alpaca) the tool section goes to the system text,
earlier calls are written in the reply format (`<tool_call>…</tool_call>`) and tool results become user turns
wrapped in `<tool_response>` (Alpaca: "Tool:" lines of the conversation).

Findings are truncated to the expert token budget and to what the context leaves after the completion.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from experts.context import truncate_to_budget
from models.prompts import ChatTemplate, format_alpaca
from server.api.errors import bad_request
from server.api.schemas import ChatMessage, ImagePart, RefusalPart
from server.api.tools import ToolCall, ToolSet, history_text

CHAT_SYSTEM = "You are a helpful assistant."
CHAT_SYSTEM_IMAGES = "You cannot see images; automatic image analysis describes them for you."
NOTHING_FOUND = "The automatic image analysis found nothing it could recognise in the image."


@dataclass(frozen=True)
class Turn:
    role: str  # system | user | assistant | tool
    text: str
    images: int = 0  # image parts in this message
    name: str | None = None  # the message's `name`: passed to chat templates (Alpaca has no place for it)
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


@dataclass(frozen=True)
class ChatInput:
    """A request's messages reduced to text turns and the image URLs in order of appearance."""

    turns: tuple[Turn, ...]
    image_urls: tuple[str, ...]
    question: str  # the last user message's text: what experts that read the question see
    continue_final: bool = False  # the last turn is the assistant's: continue it instead of starting a new one


def parse_messages(messages: Sequence[ChatMessage]) -> ChatInput:
    turns, urls = [], []
    for m in messages:
        before = len(urls)
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if isinstance(part, ImagePart):
                    urls.append(part.image_url.url)
                elif isinstance(part, RefusalPart):  # an assistant's earlier refusal, as the text it said
                    texts.append(part.refusal)
                else:
                    texts.append(part.text)
            text = "\n".join(t for t in texts if t)
        else:
            text = m.content or ""
        role = "system" if m.role in ("system", "developer") else m.role
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ())
        turns.append(Turn(role, text, len(urls) - before, m.name, calls, m.tool_call_id))
    return chat_input(turns, urls)


def chat_input(turns: Sequence[Turn], urls: Sequence[str]) -> ChatInput:
    """The ChatInput of parsed turns (the chat messages or the Responses API's input items)."""
    turns = list(turns)
    if not turns:
        raise bad_request("the conversation is empty", "messages", "invalid_messages")
    users = [t for t in turns if t.role == "user"]
    if not users:
        raise bad_request("the conversation needs a user message", "messages", "invalid_messages")
    final = turns[-1].role == "assistant" and not turns[-1].tool_calls
    return ChatInput(tuple(turns), tuple(urls), users[-1].text, continue_final=final)


class PromptBuilder:
    """Renders prompts for one loaded model and fits expert findings into its context."""

    def __init__(self, prompt_format: str, chat_template: str | None, tokenizer, max_context: int):
        self.format = prompt_format
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.template = None
        if prompt_format == "chat":
            if not chat_template:
                raise ValueError("a chat-format model needs a chat template")
            tokens = getattr(tokenizer, "tokens", None)
            bos = tokens[tokenizer.bos_id] if tokens and tokenizer.bos_id is not None else ""
            eos = tokens[tokenizer.eos_id] if tokens else ""
            self.template = ChatTemplate(chat_template, bos_token=bos, eos_token=eos)

    # ------------------------------------------------------------------------------------------ text
    def render(self, chat: ChatInput, findings: str | None, tools: ToolSet | None = None) -> str:
        tools = tools if tools is not None and tools.active else None
        if self.format == "alpaca":
            return self._alpaca(chat, findings, tools)
        return self._chat(chat, findings, tools)

    def _alpaca(self, chat: ChatInput, findings: str | None, tools: ToolSet | None) -> str:
        turns = chat.turns[:-1] if chat.continue_final else chat.turns
        at = max(i for i, t in enumerate(turns) if t.role == "user")  # the instruction: the last user turn
        last, history = turns[at], turns[:at] + turns[at + 1 :]
        system = "\n".join([t.text for t in history if t.role == "system" and t.text] +
                           ([tools.instructions()] if tools else []))
        names = {"user": "User", "assistant": "Assistant", "tool": "Tool"}
        dialogue = "\n".join(f"{names[t.role]}: {_generic_text(t)}" for t in history if t.role != "system")
        sections = [system, f"Conversation so far:\n{dialogue}" if dialogue else "", findings or ""]
        context = "\n\n".join(s for s in sections if s)
        prompt = format_alpaca(last.text, input=context or None)
        return prompt + chat.turns[-1].text if chat.continue_final else prompt

    def _messages(self, chat: ChatInput, native: bool) -> tuple[list[dict], list[int]]:
        """The turns as template messages, and the message each turn went to."""
        messages: list[dict] = []
        where: list[int] = []
        for t in chat.turns:
            m: dict = {"role": t.role, "content": t.text, **({"name": t.name} if t.name else {})}
            if native:
                if t.tool_calls:
                    m["tool_calls"] = [{"id": c.id, "type": "function",
                                        "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                                       for c in t.tool_calls]
                if t.tool_call_id is not None:
                    m["tool_call_id"] = t.tool_call_id
            elif t.role == "tool":  # a tool result: a user turn, consecutive results in one
                text = f"<tool_response>\n{t.text}\n</tool_response>"
                if where and chat.turns[len(where) - 1].role == "tool":
                    messages[-1]["content"] += "\n" + text
                    where.append(len(messages) - 1)
                    continue
                m = {"role": "user", "content": text}
            elif t.tool_calls:
                m["content"] = history_text(t.text, t.tool_calls)
            where.append(len(messages))
            messages.append(m)
        return messages, where

    def _chat(self, chat: ChatInput, findings: str | None, tools: ToolSet | None) -> str:
        native = self.template.takes_tools
        messages, where = self._messages(chat, native)
        images = [CHAT_SYSTEM_IMAGES] if findings is not None else []
        if findings is not None:
            with_images = [i for i, t in enumerate(chat.turns) if t.images]
            at = where[with_images[-1] if with_images else len(chat.turns) - 1]
            messages[at]["content"] = f"Image analysis:\n{findings}\n\nQuestion: {messages[at]['content']}"
        section = [tools.instructions()] if tools is not None and not native else []
        if messages[0]["role"] == "system" and (images or section):
            messages[0]["content"] = "\n\n".join([messages[0]["content"], *images, *section]).strip()
        elif images or section:
            messages.insert(0, {"role": "system", "content": "\n\n".join([" ".join([CHAT_SYSTEM, *images]), *section])})
        final = messages[-1]["content"] if chat.continue_final else ""
        if chat.continue_final and not final:  # nothing to continue: the reply starts afresh
            messages = messages[:-1]
        extra = {"tools": [t.openai() for t in tools.offered()]} if native and tools is not None else {}
        try:
            text = self.template.render(messages, add_generation_prompt=not final, **extra)
        except Exception as e:  # a template's raise_exception (e.g. roles must alternate)
            raise bad_request(f"the model's chat template refused these messages: {e}", "messages") from None
        if final:  # cut the end of turn the template wrote after the message: the model goes on from its text
            at = text.rfind(final)
            if at < 0:
                raise bad_request("the model's chat template changed the last assistant message, so it cannot be "
                                  "continued", "messages", "invalid_messages")
            text = text[: at + len(final)]
        return text

    # ---------------------------------------------------------------------------------------- tokens
    def encode(self, text: str) -> list[int]:
        tok = self.tokenizer
        bos = getattr(tok, "add_bos", True) and tok.bos_id is not None
        if bos and self.template is not None and self.template.bos_token and text.startswith(
                self.template.bos_token):
            bos = False  # the template wrote it already
        return tok.encode(text, bos=bool(bos))

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, bos=False))

    def fit_findings(self, chat: ChatInput, findings: str, budget: int, prompt_budget: int,
                     tools: ToolSet | None = None) -> str:
        """Cut `findings` to `budget` tokens and so that the whole prompt stays within `prompt_budget`."""
        findings = truncate_to_budget(findings, budget, self.count)
        if not findings:
            return findings
        base = len(self.encode(self.render(chat, "", tools)))

        def extra(text: str) -> int:  # tokens the findings add to the prompt
            return len(self.encode(self.render(chat, text, tools))) - base

        return truncate_to_budget(findings, max(0, prompt_budget - base), extra)


def describe_findings(per_image: Sequence[str], n_images: int) -> str:
    """Join each image's findings; with several images each block says which image it is about."""
    if n_images <= 1:
        return (per_image[0] if per_image else "") or NOTHING_FOUND
    blocks = [f"Image {i + 1}:\n{text or NOTHING_FOUND}" for i, text in enumerate(per_image)]
    return "\n\n".join(blocks)


def _generic_text(turn: Turn) -> str:
    """A turn's text in the generic tool format (Alpaca's conversation lines)."""
    if turn.role == "tool":
        return f"<tool_response>\n{turn.text}\n</tool_response>"
    return history_text(turn.text, turn.tool_calls) if turn.tool_calls else turn.text


def _arguments(text: str):
    """A call's arguments as HF chat templates take them: an object (the JSON text if it is not one)."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text
