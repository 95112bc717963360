"""Typed access to the fields of an OpenAI JSON body, and the error every refusal is answered with.

Types are checked exactly (a bool is not an int, NaN/Infinity are not numbers, a lone surrogate is
not text), and each refusal is an `APIError` naming the field at fault in `param`:

    body = parse_json(raw)                           # a dict, or APIError 400
    n = get_int(body, "n")                           # None when absent
    include = get_bool(options, "include_usage", "stream_options.")
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

log = logging.getLogger("parathinker.serve")
_IGNORED: set[str] = set()  # field names log_ignored has logged in this process


class APIError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str) -> APIError:
    """A 400 about the request field `param`."""
    return APIError(400, message, param=param)


# ----- the body
def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 (malformed, NaN/Infinity, nested too deep)."""
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise APIError(400, "request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise APIError(400, "request body must be a JSON object")
    return body


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a valid JSON number")


# ----- typed field access
def get_typed(body: dict[str, Any], name: str, types: tuple[type, ...], what: str,
              prefix: str = "") -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise bad(prefix + name, f"'{prefix}{name}' must be {what}, got {type(value).__name__} "
                                 f"{short(value)}")
    return value


def short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def get_int(body: dict[str, Any], name: str, prefix: str = "") -> int | None:
    return get_typed(body, name, (int,), "an integer", prefix)


def get_bool(body: dict[str, Any], name: str, prefix: str = "") -> bool | None:
    return get_typed(body, name, (bool,), "a boolean", prefix)


def get_number(body: dict[str, Any], name: str, prefix: str = "") -> float | None:
    value = get_typed(body, name, (int, float), "a number", prefix)
    if value is not None and not math.isfinite(value):
        raise bad(prefix + name, f"'{prefix}{name}' must be a finite number")
    return None if value is None else float(value)


def checked_text(value: str, param: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"), which no tokenizer (nor UTF-8) can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad(param, f"'{param}' contains a lone surrogate (not valid Unicode)") from None
    return value


def log_ignored(body: dict[str, Any], known: set[str] | frozenset[str]) -> None:
    """Fields outside `known` are ignored, as OpenAI clients expect (they send `user`,
    `metadata`, ...); each name is logged once per process, so a misspelt extension field shows
    in the log."""
    for name in sorted(set(body) - known - _IGNORED):
        _IGNORED.add(name)
        log.warning("ignoring the request field %r (not read by this server; logged once)",
                    name[:60])
