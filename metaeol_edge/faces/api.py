"""What every route of the HTTP API shares: the limits, the JSON error, and reading and checking a request.

The server's embedding routes and the search routes (:mod:`metaeol_edge.faces.search.http`) both
use these, so a body limit, a bad JSON body or a wrong type gets the same answer everywhere.
"""

import json
import sys
from dataclasses import dataclass

from metaeol_edge.errors import kind_of


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; every value has a flag of ``metaeol serve``."""

    max_body_bytes: int = 4_000_000
    max_inputs: int = 2048
    max_chars: int = 20_000
    timeout_s: float = 120.0
    max_queue: int = 256  # requests waiting per model
    batch_size: int = 64  # sentences per engine batch


class ApiError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _timeout(limits: Limits) -> ApiError:
    return ApiError(
        503, f"the request took over {limits.timeout_s:g} s; retry later", "server_error",
        code="timeout", headers={"Retry-After": "5"},
    )  # fmt: skip


def parse_json(body: bytes, limits: Limits) -> dict[str, object]:
    if len(body) > limits.max_body_bytes:
        raise ApiError(413, f"request body of {len(body)} bytes is over the limit of {limits.max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not UTF-8 (byte {body[exc.start]:#04x} at offset {exc.start})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(
            400, f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from exc
    except ValueError as exc:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise ApiError(
            400, f"request body holds an integer of over {sys.get_int_max_str_digits()} digits: send a smaller number"
        ) from exc
    except RecursionError as exc:  # [[[[... deeper than the parser's stack
        raise ApiError(400, "request body nests arrays or objects too deeply to read") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    return data


async def read_body(request, limits: Limits) -> bytes:
    """The request body, read a chunk at a time and refused with a 413 as soon as it passes the limit:
    a body sent with ``Transfer-Encoding: chunked`` has no Content-Length for the middleware to check."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise ApiError(413, f"request body is over the limit of {limits.max_body_bytes} bytes (stopped reading)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_inputs(data: dict[str, object], limits: Limits, key: str = "input") -> list[str]:
    """The ``input`` field as a list of non-empty strings, or a 400 naming what is wrong."""
    if key not in data:
        raise ApiError(400, f"'{key}' is required: a string or an array of strings", param=key)
    value = data[key]
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ApiError(400, f"'{key}' must be a string or an array of strings, not {_kind(value)}", param=key)
    if not items:
        raise ApiError(400, f"'{key}' is an empty array: give at least one string", param=key)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in items) or all(isinstance(x, list) for x in items):
        raise ApiError(
            400,
            f"'{key}' holds token ids: this server embeds text (its model has its own tokenizer); send strings. "
            "LangChain's OpenAIEmbeddings sends token ids unless given check_embedding_ctx_length=False",
            param=key,
            code="token_ids_not_supported",
        )
    if len(items) > limits.max_inputs:
        raise ApiError(400, f"'{key}' has {len(items)} items, over the limit of {limits.max_inputs}", param=key)
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if not isinstance(value, str) else key
        if not isinstance(item, str):
            raise ApiError(400, f"{where} must be a string, not {_kind(item)}", param=key)
        if not item.strip():
            raise ApiError(400, f"{where} is empty or whitespace only", param=key)
        if "\x00" in item:
            raise ApiError(400, f"{where} contains a NUL character", param=key)
        if len(item) > limits.max_chars:
            raise ApiError(400, f"{where} has {len(item)} characters, over the limit of {limits.max_chars}", param=key)
    return items  # type: ignore[return-value]


def _kind(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value)) or kind_of(value)  # JSON's names; "an integer", "a number" for the rest
