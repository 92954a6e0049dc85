"""OpenAI's API for decoder bundles: ``/v1/completions``, ``/v1/chat/completions`` (the tokenizer's chat
template), ``/v1/models``; streaming as server-sent events (``data: {chunk}`` ... ``data: [DONE]``).

This module only translates: a request's JSON into a prompt and sampling options, handed to the bundle's
``GenerationServer`` (``engines.runtime.generate.continuous``), and its tokens back into OpenAI's objects.
Fields follow OpenAI's defaults (temperature 1, top_p 1, ``max_tokens`` 16 for completions and the rest of
the context for chat); vLLM's extras ``top_k``, ``repetition_penalty`` and ``ignore_eos`` are accepted.
What it cannot honour (``n`` > 1, ``logprobs``, ``echo``, presence or frequency penalties) is a 400 naming
the field rather than silently different output. A prompt may be text or a list of token ids. ``stop``
strings end the text where they first appear (held back while a stream could still be inside one). A
streaming request is answered only once its first token exists, so a refused or expired request still gets
its status code (429, 504) instead of a stream that breaks; a client that disconnects cancels its
generation, which frees its KV slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from engines.runtime.generate import GenerationStream, Sampling
from engines.runtime.generate.text import Detokenizer
from engines.serve.chat import render
from engines.serve.errors import ApiError, classify, headers
from engines.serve.models import Served

MAX_STOPS = 4  # as OpenAI's API


def error_response(exc: BaseException) -> JSONResponse:
    error = classify(exc)
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            413: "invalid_request_error", 429: "rate_limit_error", 504: "timeout"}.get(error.status, "server_error")
    return JSONResponse({"error": {"message": error.message, "type": kind, "param": error.param, "code": None}},
                        status_code=error.status, headers=headers(error))


def models_list(models: dict[str, Served]) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [
        {"id": m.name, "object": "model", "created": m.created, "owned_by": "planforge",
         "max_model_len": m.generation.max_length} for m in models.values() if m.decoder]})


async def completions(request: Request, models: dict[str, Served], body: dict, chat: bool) -> Response:
    model = _model(models, body)
    params = _Params(body, chat)
    if chat:
        if model.tokenizer is None:
            raise ApiError(400, f"model {model.name!r} ships no tokenizer: chat needs one", "messages")
        prompt = model.tokenizer.encode(render(model.tokenizer, body.get("messages")), special=False)
    else:
        prompt = _prompt(model, body.get("prompt"))
    max_tokens = params.max_tokens if params.max_tokens is not None else \
        (max(model.generation.max_length - len(prompt), 1) if chat else 16)
    stream = model.generation.submit(prompt, max_tokens, params.sampling, ignore_eos=params.ignore_eos)
    tokens = stream.tokens_async()
    text = _Text(model, params.stop)
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if not params.stream:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, stream))
        try:
            out = []
            async for token in tokens:
                out.append(text.add(token))
                if text.stopped:
                    stream.cancel()
                    break
        finally:
            watcher.cancel()
        out.append(text.finish())
        choice = {"index": 0, "finish_reason": _reason(stream, text), "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": "".join(out)}} if chat else {"text": "".join(out)})
        return JSONResponse({"id": ident, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": model.name, "choices": [choice],
                             "usage": _usage(stream)})
    try:  # the first token (or the failure) before the status line: 429 and 504 stay status codes
        first = await tokens.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        stream.cancel()
        raise
    return StreamingResponse(_events(stream, tokens, first, text, chat, ident, created, model.name,
                                     params.include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(stream: GenerationStream, tokens, first, text: _Text, chat: bool, ident: str, created: int,
                  name: str, include_usage: bool):
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(piece: str | None, reason: str | None = None, role: bool = False) -> str:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if piece is None else {"content": piece})
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": reason, "logprobs": None}
        doc = {"id": ident, "object": kind, "created": created, "model": name, "choices": [choice]}
        return f"data: {json.dumps(doc)}\n\n"

    try:
        if chat:
            yield chunk(None, role=True)
        pending = [] if first is None else [first]
        while True:
            for token in pending:
                piece = text.add(token)
                if piece:
                    yield chunk(piece)
                if text.stopped:
                    stream.cancel()
                    break
            if text.stopped:
                break
            try:
                pending = [await tokens.__anext__()]
            except StopAsyncIteration:
                break
        rest = text.finish()
        if rest:
            yield chunk(rest)
        yield chunk(None, _reason(stream, text))
        if include_usage:
            usage = {"id": ident, "object": kind, "created": created, "model": name, "choices": [],
                     "usage": _usage(stream)}
            yield f"data: {json.dumps(usage)}\n\n"
    except Exception as exc:  # noqa: BLE001 - the status line has gone: the error travels as an event
        error = classify(exc)
        yield f"data: {json.dumps({'error': {'message': error.message, 'code': error.status}})}\n\n"
    finally:
        if not stream.done:
            stream.cancel()  # a disconnected client: its slot is freed at the next step
    yield "data: [DONE]\n\n"


async def _cancel_on_disconnect(request: Request, stream: GenerationStream) -> None:
    while not stream.done:
        if await request.is_disconnected():
            stream.cancel()
            return
        await asyncio.sleep(0.2)


def _reason(stream: GenerationStream, text: _Text) -> str:
    return "stop" if text.stopped or stream.finish_reason == "stop" else "length"


def _usage(stream: GenerationStream) -> dict:
    prompt, completion = len(stream.prompt), len(stream.tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": stream.cached_tokens}}


def _model(models: dict[str, Served], body: dict) -> Served:
    decoders = {k: m for k, m in models.items() if m.decoder}
    name = body.get("model")
    if name is None and len(decoders) == 1:
        return next(iter(decoders.values()))
    if not isinstance(name, str):
        raise ApiError(400, f"'model' must name one of the served decoders ({', '.join(decoders) or 'none'})", "model")
    if name not in decoders:
        raise ApiError(404, f"model {name!r} is not served here as a decoder; served: {', '.join(decoders) or 'none'} "
                       "(GET /v1/models lists them)", "model")
    return decoders[name]


def _prompt(model: Served, prompt) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ApiError(400, f"model {model.name!r} ships no tokenizer: pass the prompt as a list of token ids",
                           "prompt")
        return model.tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise ApiError(400, "'prompt' must be a non-empty string or list of token ids (one prompt per request)", "prompt")


class _Params:
    """The sampling fields of a request, checked (module docstring)."""

    def __init__(self, body: dict, chat: bool):
        for name, ok in (("n", lambda v: v == 1), ("echo", lambda v: not v), ("logprobs", lambda v: not v),
                         ("top_logprobs", lambda v: not v), ("best_of", lambda v: v == 1),
                         ("presence_penalty", lambda v: v == 0), ("frequency_penalty", lambda v: v == 0)):
            if body.get(name) is not None and not ok(body[name]):
                raise ApiError(400, f"'{name}' = {body[name]!r} is not supported by this server", name)
        self.stream = _get(body, "stream", bool, False)
        options = _get(body, "stream_options", dict, {}) or {}
        self.include_usage = bool(options.get("include_usage", False))
        self.max_tokens = _get(body, "max_completion_tokens", int, None) if chat else None
        if self.max_tokens is None:
            self.max_tokens = _get(body, "max_tokens", int, None)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ApiError(400, f"'max_tokens' = {self.max_tokens}: expected at least 1", "max_tokens")
        temperature = _get(body, "temperature", (int, float), 1.0)
        top_p = _get(body, "top_p", (int, float), 1.0)
        top_k = _get(body, "top_k", int, 0)
        penalty = _get(body, "repetition_penalty", (int, float), 1.0)
        seed = _get(body, "seed", int, None)
        for name, value, ok, expected in (("temperature", temperature, 0 <= temperature <= 2, "0..2"),
                                          ("top_p", top_p, 0 < top_p <= 1, "in (0, 1]"),
                                          ("top_k", top_k, top_k >= 0 or top_k == -1, ">= 0 (or -1: off)"),
                                          ("repetition_penalty", penalty, penalty > 0, "> 0")):
            if not ok:
                raise ApiError(400, f"'{name}' = {value}: expected {expected}", name)
        self.sampling = Sampling(float(temperature), max(int(top_k), 0), float(top_p), float(penalty), seed)
        self.ignore_eos = _get(body, "ignore_eos", bool, False)
        stop = body.get("stop")
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOPS} non-empty strings", "stop")
        self.stop = stops


def _get(body: dict, name: str, kind, default):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and kind is not bool:
        raise ApiError(400, f"'{name}' must be a number, not {value!r}", name)
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else "number"
        raise ApiError(400, f"'{name}' must be {'an' if expected[0] in 'aeio' else 'a'} {expected}, found "
                       f"{type(value).__name__} {json.dumps(value)[:40]}", name)
    return value


class _Text:
    """Tokens to text for the client, ending at the first stop string (held back while the text so far could be
    the start of one)."""

    def __init__(self, model: Served, stops: list[str]):
        self.detokenizer = Detokenizer(model.tokenizer) if model.tokenizer is not None else None
        self.stops, self.held, self.stopped = stops, "", False

    def add(self, token: int) -> str:
        return self._feed(self.detokenizer.add(token)) if self.detokenizer else ""

    def finish(self) -> str:
        if self.detokenizer is None or self.stopped:
            return ""
        out = self._feed(self.detokenizer.flush())
        if not self.stopped:
            out, self.held = out + self.held, ""
        return out

    def _feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.held += piece
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.held, self.stopped = self.held[:min(found)], "", True
            return out
        cut = len(self.held)
        for k in range(min(max((len(s) - 1 for s in self.stops), default=0), len(self.held)), 0, -1):
            if any(s.startswith(self.held[-k:]) for s in self.stops):
                cut = len(self.held) - k
                break
        out, self.held = self.held[:cut], self.held[cut:]
        return out
