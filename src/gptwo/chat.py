"""Conversations as text and tokens: gptwo's chat template for GPT-2's vocabulary, rendering, loss masks.

GPT-2 has no chat format and no special tokens beyond <|endoftext|>. gptwo's template (`CHAT_TEMPLATE`)
uses plain-text role markers, and each assistant turn ends with <|endoftext|>, which is where
generation stops:

    ### System:
    You answer in one word.

    ### User:
    Capital of France?

    ### Assistant:
    Paris<|endoftext|>### User:
    ...

Templates are Jinja, rendered as transformers renders them (a sandboxed environment with trim_blocks
and lstrip_blocks, `raise_exception`, the tokenizer's special tokens), and stored the way transformers
reads them (`chat_template` in tokenizer_config.json, or chat_template.jinja), so
`tokenizer.apply_chat_template` in transformers gives the same ids as `encode_chat`.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from gptwo.errors import GptwoError

if TYPE_CHECKING:
    from gptwo.tokenizer import Tokenizer

EOT = "<|endoftext|>"
ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('role ' + message['role'] + ' is not one of system, user, assistant') -}}"
    "{%- endif -%}"
    "{{- '### ' + message['role'] | capitalize + ':\\n' + message['content'] | trim -}}"
    "{%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- else -%}{{- '\\n\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Assistant:\\n' -}}{%- endif -%}"
)
_TEMPLATE_FILE = "chat_template.jinja"
_CONFIG_FILE = "tokenizer_config.json"
_FIX_MESSAGES = 'give messages as [{"role": "user", "content": "..."}, ...]'


def check_messages(messages: object, where: str = "messages") -> list[dict[str, str]]:
    """`messages` as a list of {"role", "content"} string dicts; OpenAI's content parts of type text are joined."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise GptwoError(f"{where} is not a non-empty list of messages", _FIX_MESSAGES)
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise GptwoError(f"{where}[{index}] is not an object with a string 'role'", _FIX_MESSAGES)
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(
                isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise GptwoError(
                    f"{where}[{index}].content holds a part that is not text", "gptwo models read text parts only"
                )
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise GptwoError(f"{where}[{index}].content is not a string", _FIX_MESSAGES)
        out.append({"role": message["role"], "content": content})
    return out


def _is_text_part(part: object) -> bool:
    return isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as error:
        raise GptwoError(f"the chat template does not compile: {error}", "fix or replace the chat template") from None


def check_template(template: str) -> None:
    """Raise a GptwoError unless `template` compiles as a chat template."""
    _compiled(template)


def render(
    messages: Sequence[Mapping[str, str]],
    template: str = CHAT_TEMPLATE,
    add_generation_prompt: bool = False,
    eos_token: str = EOT,
    variables: Mapping[str, object] | None = None,
) -> str:
    """The conversation as the text the model reads (with the assistant's cue at the end if asked); `variables`
    are more names for the template (as transformers' template kwargs)."""
    import jinja2

    messages = check_messages(messages)
    try:
        return _compiled(template).render(
            **(variables or {}),
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=eos_token,
            eos_token=eos_token,
            unk_token=eos_token,
        )
    except jinja2.exceptions.TemplateError as error:
        raise GptwoError(f"the chat template rejects these messages: {error}", _FIX_MESSAGES) from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as error:
        # a template's own operations on what it was given (e.g. odd chat_template_kwargs) failing
        raise GptwoError(
            f"the chat template failed on these messages ({type(error).__name__}: {error})",
            "check the messages and chat_template_kwargs against what the template expects",
        ) from None


def assistant_spans(
    messages: Sequence[Mapping[str, str]], template: str = CHAT_TEMPLATE
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the assistant writes.

    An assistant turn's span is what rendering it adds after the conversation before it with the
    assistant's cue (its text and end marker), so any template whose renderings extend one another works.
    """
    messages = check_messages(messages)
    text = render(messages, template)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        cue = render(messages[:index], template, add_generation_prompt=True) if index else render_cue(template)
        through = render(messages[: index + 1], template)
        if not (through.startswith(cue) and text.startswith(through)):
            raise GptwoError(
                "the chat template renders a conversation's turns differently as it grows, so the assistant's "
                "tokens cannot be found",
                "use gptwo's chat template or one whose renderings extend each other",
            )
        spans.append((len(cue), len(through)))
    return text, spans


def render_cue(template: str = CHAT_TEMPLATE) -> str:
    """What the template puts before a first message written by the assistant: its cue alone."""
    import jinja2

    try:
        return _compiled(template).render(messages=[], add_generation_prompt=True, bos_token=EOT, eos_token=EOT)
    except jinja2.exceptions.TemplateError:
        return ""


def encode_chat(
    tok: Tokenizer, messages: Sequence[Mapping[str, str]], template: str = CHAT_TEMPLATE, count_all: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation, and for each token whether the loss counts it.

    The whole text is tokenized at once (as transformers' apply_chat_template does); a token counts
    when it begins inside an assistant span (`count_all`: every token counts).
    """
    text, spans = assistant_spans(messages, template)
    ids = tok.encode(text)
    if count_all:
        return ids, [True] * len(ids)
    # character offset where each token begins (tokens may split a character: its bytes start it)
    starts, offset = [], 0
    char_of_byte = _char_offsets(text)
    for token in ids:
        starts.append(char_of_byte[min(offset, len(char_of_byte) - 1)])
        offset += len(tok.token_bytes(token))
    if offset != len(char_of_byte) - 1:
        raise GptwoError("the tokenizer does not give back the conversation's bytes", "use a byte-level BPE tokenizer")
    span_starts = [start for start, _ in spans]
    mask = []
    for start in starts:
        at = bisect.bisect_right(span_starts, start) - 1
        mask.append(at >= 0 and start < spans[at][1])
    return ids, mask


def _char_offsets(text: str) -> list[int]:
    """For each byte of text's UTF-8 (and one past the end), the index of the character it belongs to."""
    out = []
    for index, char in enumerate(text):
        out.extend([index] * len(char.encode("utf-8")))
    out.append(len(text))
    return out


def prompt_ids(tok: Tokenizer, messages: Sequence[Mapping[str, str]], template: str = CHAT_TEMPLATE) -> list[int]:
    """Token ids of a conversation to be answered: rendered with the assistant's cue at the end."""
    return tok.encode(render(messages, template, add_generation_prompt=True))


def continued_text(
    messages: Sequence[Mapping[str, str]], template: str = CHAT_TEMPLATE, variables: Mapping[str, object] | None = None
) -> str:
    """The conversation rendered to end inside its last message, so that generating continues that message.

    The rendering is cut after the last occurrence of the final message's text (stripped, as templates
    often trim it; with its trailing whitespace where the template kept it): transformers'
    `continue_final_message` rule.
    """
    messages = check_messages(messages)
    text = render(messages, template, variables=variables)
    final = messages[-1]["content"]
    core = final.strip()
    at = text.rfind(core) if core else -1
    if at < 0:
        raise GptwoError(
            "continue_final_message: the last message's text does not appear in the rendered conversation"
            if core
            else "continue_final_message: the last message is empty, so there is nothing to continue",
            "send a last message with text, or add_generation_prompt: true to start a new one",
        )
    unindented = final.lstrip()
    return text[: at + (len(unindented) if text.startswith(unindented, at) else len(core))]


# ---------------------------------------------------------------- stored with a model
def read_chat_template(directory: str) -> str | None:
    """The model folder's chat template (chat_template.jinja, or `chat_template` in tokenizer_config.json)."""
    path = os.path.join(directory, _TEMPLATE_FILE)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(directory, _CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    except (OSError, ValueError, AttributeError):
        raise GptwoError(f"{path} is not a JSON object", "fix or delete the file") from None
    if isinstance(template, list):  # transformers' named templates: [{"name", "template"}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise GptwoError(f"{path}: chat_template is not a string", "store the template as one Jinja string")
    return template
