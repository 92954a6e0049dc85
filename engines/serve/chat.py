"""A chat request's messages rendered with the model's own chat template (``chat_template.jinja`` or
``tokenizer_config.json``'s ``chat_template``, copied into the bundle at build), in a sandboxed Jinja2
environment as transformers' ``apply_chat_template`` renders it: ``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token`` and ``raise_exception``. jinja2 rather than a hand-written renderer: the
templates are Jinja programs (loops, conditions, filters) that models ship, and jinja2's sandbox keeps a
template from reaching Python."""

from __future__ import annotations

import functools
import json

from engines.runtime.generate.text import Tokenizer
from engines.serve.errors import ApiError

ROLES = ("system", "developer", "user", "assistant", "tool")


def render(tokenizer: Tokenizer, messages) -> str:
    if tokenizer.chat_template is None:
        raise ApiError(400, "this model ships no chat template (chat_template.jinja or tokenizer_config.json's "
                       "chat_template): use /v1/completions with the prompt formatted as the model expects",
                       "messages")
    checked = _messages(messages)
    try:
        return _compiled(tokenizer.chat_template).render(
            messages=checked, add_generation_prompt=True, bos_token=tokenizer.special("bos_token"),
            eos_token=tokenizer.special("eos_token"))
    except _TemplateRefusal as exc:
        raise ApiError(400, f"the model's chat template refused these messages: {exc}", "messages") from exc


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
    out = []
    for k, message in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"{where} must be an object with a 'role' among {', '.join(ROLES)}", where)
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"{where}.content[{j}]: only text parts are supported", f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")
        out.append({"role": message["role"], "content": content})
    return out


class _TemplateRefusal(Exception):
    pass


def _raise(message: str):
    raise _TemplateRefusal(message)


@functools.lru_cache(maxsize=8)
def _compiled(source: str):
    from jinja2.ext import loopcontrols  # noqa: PLC0415 - only a chat request needs it
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: PLC0415

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise
    return env.from_string(source)
