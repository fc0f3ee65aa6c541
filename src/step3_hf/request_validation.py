"""Validation of OpenAI-style requests at the door of `step3-serve`, before transformers' server sees them.

`transformers serve` answers a malformed field with HTTP 500 (a string `max_tokens`, `messages` given as a string,
integer content), lets nonsense through (`max_tokens: -5`, `temperature: -1`), and does not check that the prompt
plus the requested tokens fit the model's context on every endpoint. `RequestValidationMiddleware` is an ASGI
middleware for the app the server builds: it checks the body of each generation request against `ENDPOINTS` and
the model's context, and answers what it refuses with an OpenAI-style error naming the field. A body it accepts
reaches the server unchanged, except that a missing token limit is lowered to what is left of the context when the
server's default would run past it.

The checks are plain functions of the body (`check_request`), testable without a server.
"""

import asyncio
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# HTTP status for a body that is well-formed JSON but not a valid request (FastAPI's own choice for validation
# errors), and for a valid request that the model cannot serve (OpenAI's `context_length_exceeded`).
INVALID = 422
TOO_LONG = 400


class RequestError(ValueError):
    """A request refused at the door: the HTTP status, the offending field (a dotted path) and why."""

    def __init__(self, status: int, field: str | None, message: str):
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": "invalid_request_error", "param": self.field}}


@dataclass(frozen=True)
class Number:
    """A JSON number (not a boolean) within `[low, high]`; `integer` demands a whole number."""

    low: float = -math.inf
    high: float = math.inf
    integer: bool = False
    low_inclusive: bool = True

    def check(self, field: str, value: Any) -> None:
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, (int, float) if not self.integer else int):
            raise RequestError(INVALID, field, f"`{field}` must be {kind}, got {json.dumps(value)[:40]}.")
        if not math.isfinite(value):
            raise RequestError(INVALID, field, f"`{field}` must be finite, got {value}.")
        too_low = value < self.low if self.low_inclusive else value <= self.low
        if too_low or value > self.high:
            low = "[" if self.low_inclusive else "("
            raise RequestError(INVALID, field, f"`{field}` must be in {low}{self.low:g}, {self.high:g}], got {value}.")


def _check_type(field: str, value: Any, kinds: tuple[type, ...], what: str) -> None:
    if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
        raise RequestError(INVALID, field, f"`{field}` must be {what}, got {json.dumps(value)[:40]}.")


TOKEN_LIMIT = Number(low=1, integer=True)
# The sampling fields every endpoint takes, with OpenAI's documented ranges.
COMMON_FIELDS: dict[str, Number | tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a string"),
    "stream": ((bool,), "true or false"),
    "temperature": Number(0, 2),
    "top_p": Number(0, 1, low_inclusive=False),
    "seed": Number(integer=True),
    "frequency_penalty": Number(-2, 2),
    "presence_penalty": Number(-2, 2),
}


@dataclass(frozen=True)
class Endpoint:
    """What one generation endpoint takes: its prompt field and the fields that bound the answer's length."""

    prompt_field: str
    token_limit_fields: tuple[str, ...]


ENDPOINTS = {
    "/v1/chat/completions": Endpoint("messages", ("max_completion_tokens", "max_tokens")),
    "/v1/completions": Endpoint("prompt", ("max_tokens",)),
    "/v1/responses": Endpoint("input", ("max_output_tokens",)),
}
MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
TEXT_PARTS = ("text", "input_text", "output_text")


def _text_of_content(field: str, content: Any, *, allow_none: bool) -> str:
    """The text of a message's `content`: a string, or a list of parts of which the text parts are counted."""
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(INVALID, field, f"`{field}` must be a string or a list of content parts.")
    texts = []
    for j, part in enumerate(content):
        part_field = f"{field}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RequestError(INVALID, part_field, f"`{part_field}` must be an object with a string `type`.")
        if part["type"] not in TEXT_PARTS:
            # The server runs the language model; an image would be dropped or fetched, never seen by the model.
            raise RequestError(
                INVALID,
                f"{part_field}.type",
                f"`{part_field}.type` is {part['type']!r}; step3-serve takes text content only "
                f"({', '.join(TEXT_PARTS)})",
            )
        _check_type(f"{part_field}.text", part.get("text"), (str,), "a string")
        texts.append(part["text"])
    return "".join(texts)


def _chat_messages(field: str, messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(INVALID, field, f"`{field}` must be a non-empty list of messages.")
    return [_chat_message(f"{field}[{i}]", message) for i, message in enumerate(messages)]


def _chat_message(field: str, message: Any) -> dict:
    if not isinstance(message, dict):
        raise RequestError(INVALID, field, f"`{field}` must be an object with `role` and `content`.")
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        raise RequestError(INVALID, f"{field}.role", f"`{field}.role` must be one of {', '.join(MESSAGE_ROLES)}.")
    # An assistant message that only calls tools may have no content.
    text = _text_of_content(f"{field}.content", message.get("content"), allow_none=role == "assistant")
    return {"role": role, "content": text}


def _response_messages(body: dict) -> list[dict]:
    """`/v1/responses` input as chat messages: a string, a list of content parts, or a list of items."""
    value = body.get("input")
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        if isinstance(value[0], dict) and "role" not in value[0]:  # a flat list of content parts, as the server reads it
            messages = [{"role": "user", "content": _text_of_content("input", value, allow_none=False)}]
        else:
            # Messages, and the tool calls and outputs of a previous response (counted by their JSON text).
            messages = [
                _chat_message(f"input[{i}]", item)
                if not isinstance(item, dict) or "role" in item
                else {"role": "user", "content": json.dumps(item)}
                for i, item in enumerate(value)
            ]
    else:
        raise RequestError(INVALID, "input", "`input` must be a string or a non-empty list.")
    instructions = body.get("instructions")
    if instructions is not None:
        _check_type("instructions", instructions, (str,), "a string")
        messages.insert(0, {"role": "system", "content": instructions})
    return messages


def check_fields(path: str, body: Any) -> tuple[Endpoint, list[dict] | str]:
    """Check the types and ranges of a generation request; return its endpoint and its prompt (messages or text)."""
    endpoint = ENDPOINTS[path]
    if not isinstance(body, dict):
        raise RequestError(INVALID, None, "The request body must be a JSON object.")
    for field, rule in COMMON_FIELDS.items():
        if body.get(field) is not None:
            if isinstance(rule, Number):
                rule.check(field, body[field])
            else:
                _check_type(field, body[field], *rule)
    for field in endpoint.token_limit_fields:
        if body.get(field) is not None:
            TOKEN_LIMIT.check(field, body[field])
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or isinstance(stop, list) and all(isinstance(s, str) for s in stop)
    ):
        raise RequestError(INVALID, "stop", "`stop` must be a string or a list of strings.")

    if endpoint.prompt_field == "messages":
        if "messages" not in body:
            raise RequestError(INVALID, "messages", "`messages` is required.")
        return endpoint, _chat_messages("messages", body["messages"])
    if endpoint.prompt_field == "prompt":
        _check_type("prompt", body.get("prompt"), (str,), "a string")
        return endpoint, body["prompt"]
    return endpoint, _response_messages(body)


def check_request(
    path: str,
    body: Any,
    count_tokens: Callable[[list[dict] | str, dict], int],
    context_length: int,
    default_token_limit: int,
) -> dict:
    """Validate a generation request to `path` and return the body to forward.

    `count_tokens(prompt, body)` gives the prompt's length in tokens as the server renders it. A prompt that leaves
    no room for one token, or a token limit that runs past the context, is refused with HTTP 400. Without a token
    limit, the server generates up to `default_token_limit` tokens: where that would run past the context, the
    returned body asks for what is left of it instead.
    """
    endpoint, prompt = check_fields(path, body)
    prompt_tokens = count_tokens(prompt, body)
    if prompt_tokens >= context_length:
        raise RequestError(
            TOO_LONG,
            endpoint.prompt_field,
            f"The prompt is {prompt_tokens} tokens; this model's context is {context_length} tokens.",
        )
    room = context_length - prompt_tokens
    given = [field for field in endpoint.token_limit_fields if body.get(field) is not None]
    if given:
        field = given[0]
        if body[field] > room:
            raise RequestError(
                TOO_LONG,
                field,
                f"The prompt ({prompt_tokens} tokens) plus {field} ({body[field]}) exceeds this model's context of "
                f"{context_length} tokens.",
            )
        return body
    if default_token_limit > room:
        return {**body, endpoint.token_limit_fields[-1]: room}
    return body


class RequestValidationMiddleware:
    """ASGI middleware: `check_request` on every POST to a generation endpoint, before the app sees it.

    `load` is called once, on the first request, off the event loop, and returns `(count_tokens, context_length,
    default_token_limit)` for `check_request`.
    """

    def __init__(self, app, load: Callable[[], tuple[Callable[[list[dict] | str, dict], int], int, int]]):
        self.app = app
        self._load = load
        self._loaded: tuple | None = None
        self._lock = asyncio.Lock()

    async def _limits(self) -> tuple:
        async with self._lock:
            if self._loaded is None:
                self._loaded = await asyncio.to_thread(self._load)
        return self._loaded

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ENDPOINTS:
            await self.app(scope, receive, send)
            return
        raw = await _read_body(receive)
        try:
            body = json.loads(raw)
        except ValueError:  # not JSON: the app answers it with its own 422
            await self.app(scope, _replay(raw, receive), send)
            return
        try:
            count_tokens, context_length, default_token_limit = await self._limits()
            checked = await asyncio.to_thread(
                check_request, scope["path"], body, count_tokens, context_length, default_token_limit
            )
        except RequestError as err:
            await _send_json(send, err.status, err.body())
            return
        if checked is not body:
            raw = json.dumps(checked).encode()
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(raw)).encode())]}
        await self.app(scope, _replay(raw, receive), send)


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(raw: bytes, receive):
    """A `receive` that hands the app the body read already, then the client's later messages (disconnects)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await receive()

    return replayed


async def _send_json(send, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})
