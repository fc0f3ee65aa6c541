"""Validation of OpenAI-style requests at the door of `step3-serve`, before transformers' server sees them.

`transformers serve` answers a malformed field with HTTP 500 (a string `max_tokens`, `messages` given as a string,
integer content), lets nonsense through (`max_tokens: -5`, `temperature: -1`), and does not check that the prompt
plus the requested tokens fit the model's context on every endpoint. `RequestValidationMiddleware` is an ASGI
middleware for the app the server builds: it checks the body of each generation request against `ENDPOINTS` and
the model's context, and answers what it refuses with an OpenAI-style error naming the field. A body it accepts
reaches the server unchanged, except that a missing token limit is lowered to what is left of the context when the
server's default would run past it.

A model served with images (a `step3_vl` checkpoint with its processor) also takes OpenAI `image_url` /
`input_image` content parts, given as `data:image/...;base64,...` URLs only: each is decoded and opened here, and
the server never fetches a URL or reads a path. Any other URL, bad base64 or bytes that are not an image get HTTP 422.

The checks are plain functions of the body (`check_request`), testable without a server.
"""

import asyncio
import base64
import binascii
import io
import json
import math
import re
import warnings
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
# Chat completions' `{"type": "image_url", "image_url": {"url": ...}}`, the Responses API's
# `{"type": "input_image", "image_url": ...}`.
IMAGE_PARTS = ("image_url", "input_image")
# An image part's URL: `data:image/<format>;base64,<bytes>`, the only kind the server takes (it never fetches).
DATA_URL = re.compile(r"data:image/(png|jpeg|jpg|webp|gif|bmp);base64,(.*)", re.DOTALL)
MAX_IMAGE_URL_CHARS = 32 * 1024 * 1024


def decode_image_url(field: str, url: Any):
    """The RGB `PIL.Image` of a `data:image/...;base64,...` URL; HTTP 422 naming `field` for anything else."""
    from PIL import Image

    _check_type(field, url, (str,), "a data URL string")
    if len(url) > MAX_IMAGE_URL_CHARS:
        raise RequestError(INVALID, field, f"`{field}` is over {MAX_IMAGE_URL_CHARS // 2**20} MiB.")
    match = DATA_URL.fullmatch(url)
    if match is None:
        raise RequestError(
            INVALID,
            field,
            f"`{field}` must be a data URL (data:image/png;base64,...); step3-serve never fetches an image from a "
            f"URL or a path, got {url[:40]!r}.",
        )
    try:
        data = base64.b64decode(match.group(2), validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(INVALID, field, f"`{field}` holds invalid base64.") from None
    try:
        with warnings.catch_warnings():
            # PIL's guard against decompression bombs (`Image.MAX_IMAGE_PIXELS`) as an error, not a warning.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except Exception as err:  # PIL's UnidentifiedImageError, truncated files, decompression bombs
        raise RequestError(INVALID, field, f"`{field}` is not a readable image: {err}") from None
    if image.width == 0 or image.height == 0:
        raise RequestError(INVALID, field, f"`{field}` is an empty image.")
    return image.convert("RGB")


def _content(field: str, content: Any, *, allow_none: bool, images: bool) -> str | list[dict]:
    """A message's `content` as the processor renders it: its text, or (when it holds images) a list of
    `{"type": "text", "text"}` and `{"type": "image", "image": PIL.Image}` parts."""
    if content is None and allow_none:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise RequestError(INVALID, field, f"`{field}` must be a string or a list of content parts.")
    parts = []
    for j, part in enumerate(content):
        part_field = f"{field}[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise RequestError(INVALID, part_field, f"`{part_field}` must be an object with a string `type`.")
        if part["type"] in TEXT_PARTS:
            _check_type(f"{part_field}.text", part.get("text"), (str,), "a string")
            parts.append({"type": "text", "text": part["text"]})
        elif part["type"] in IMAGE_PARTS and images:
            url = part.get("image_url")
            url_field = f"{part_field}.image_url"
            if isinstance(url, dict):  # chat completions nest the URL
                url, url_field = url.get("url"), f"{url_field}.url"
            parts.append({"type": "image", "image": decode_image_url(url_field, url)})
        else:
            # A part the model would not see (dropped, or fetched from somewhere) is refused instead.
            taken = TEXT_PARTS + (IMAGE_PARTS if images else ())
            raise RequestError(
                INVALID,
                f"{part_field}.type",
                f"`{part_field}.type` is {part['type']!r}; this model takes {', '.join(taken)} content"
                + ("" if images else " (its checkpoint has no image processor)"),
            )
    if all(part["type"] == "text" for part in parts):
        return "".join(part["text"] for part in parts)
    return parts


def _chat_messages(field: str, messages: Any, images: bool) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError(INVALID, field, f"`{field}` must be a non-empty list of messages.")
    return [_chat_message(f"{field}[{i}]", message, images) for i, message in enumerate(messages)]


def _chat_message(field: str, message: Any, images: bool) -> dict:
    if not isinstance(message, dict):
        raise RequestError(INVALID, field, f"`{field}` must be an object with `role` and `content`.")
    role = message.get("role")
    if role not in MESSAGE_ROLES:
        raise RequestError(INVALID, f"{field}.role", f"`{field}.role` must be one of {', '.join(MESSAGE_ROLES)}.")
    # An assistant message that only calls tools may have no content.
    content = _content(f"{field}.content", message.get("content"), allow_none=role == "assistant", images=images)
    return {"role": role, "content": content}


def _response_messages(body: dict, images: bool) -> list[dict]:
    """`/v1/responses` input as chat messages: a string, a list of content parts, or a list of items."""
    value = body.get("input")
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        if isinstance(value[0], dict) and "role" not in value[0]:  # a flat list of content parts, as the server reads it
            messages = [{"role": "user", "content": _content("input", value, allow_none=False, images=images)}]
        else:
            # Messages, and the tool calls and outputs of a previous response (counted by their JSON text).
            messages = [
                _chat_message(f"input[{i}]", item, images)
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


def check_fields(path: str, body: Any, *, images: bool = False) -> tuple[Endpoint, list[dict] | str]:
    """Check the types and ranges of a generation request; return its endpoint and its prompt (messages or text).
    `images`: the served model takes image parts (data URLs, decoded into the returned messages)."""
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
        return endpoint, _chat_messages("messages", body["messages"], images)
    if endpoint.prompt_field == "prompt":
        _check_type("prompt", body.get("prompt"), (str,), "a string")
        return endpoint, body["prompt"]
    return endpoint, _response_messages(body, images)


@dataclass(frozen=True)
class ServedLimits:
    """What requests are checked against. `count_tokens(prompt, body)` gives the prompt's length in tokens as the
    server renders it (image tokens included); without a token limit the server generates up to
    `default_token_limit` tokens; `takes_images`: image parts are accepted (as data URLs)."""

    count_tokens: Callable[[list[dict] | str, dict], int]
    context_length: int
    default_token_limit: int
    takes_images: bool = False


def check_request(path: str, body: Any, limits: ServedLimits) -> dict:
    """Validate a generation request to `path` and return the body to forward.

    A prompt that leaves no room for one token, or a token limit that runs past the context, is refused with HTTP
    400. Without a token limit, where the server's default would run past the context, the returned body asks for
    what is left of it instead.
    """
    context_length, default_token_limit = limits.context_length, limits.default_token_limit
    endpoint, prompt = check_fields(path, body, images=limits.takes_images)
    prompt_tokens = limits.count_tokens(prompt, body)
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

    `load` is called once, on the first request, off the event loop, and returns the `ServedLimits` of the model.
    """

    def __init__(self, app, load: Callable[[], ServedLimits]):
        self.app = app
        self._load = load
        self._loaded: ServedLimits | None = None
        self._lock = asyncio.Lock()

    async def _limits(self) -> ServedLimits:
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
            checked = await asyncio.to_thread(check_request, scope["path"], body, await self._limits())
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
