"""Typed reads of an OpenAI request body (a JSON object) with errors that name the field, the value
and what was expected; each error carries `param` for OpenAI's error shape."""

from __future__ import annotations

import math
from typing import Any

from gpu_engine.errors import InvalidRequest


class BadParam(InvalidRequest):
    """An invalid field of the request body: `param` names it."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class Body:
    """The request's JSON object; each getter returns `default` for a missing or null field."""

    def __init__(self, data: Any):
        if not isinstance(data, dict):
            raise BadParam(None, f"the request body must be a JSON object, got {type(data).__name__}")
        self.data = data

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def raw(self, name: str, default: Any = None) -> Any:
        value = self.data.get(name)
        return default if value is None else value

    def int(self, name: str, default: int | None = None, *, lo: int | None = None,
            hi: int | None = None) -> int | None:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise BadParam(name, f"{name} must be an integer, got {value!r}")
        _check_range(name, value, lo, hi)
        return value

    def float(self, name: str, default: float | None = None, *, lo: float | None = None,
              hi: float | None = None) -> float | None:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadParam(name, f"{name} must be a finite number, got {value!r}")
        _check_range(name, value, lo, hi)
        return float(value)

    def bool(self, name: str, default: bool = False) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise BadParam(name, f"{name} must be true or false, got {value!r}")
        return value

    def str(self, name: str, default: str | None = None) -> str | None:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, str):
            raise BadParam(name, f"{name} must be a string, got {value!r}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        """A string or a list of strings (OpenAI's `stop`)."""
        value = self.data.get(name)
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise BadParam(name, f"{name} must be a string or a list of strings, got {value!r}")

    def ints(self, name: str) -> tuple[int, ...]:
        value = self.data.get(name)
        if value is None:
            return ()
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in value):
            return tuple(value)
        raise BadParam(name, f"{name} must be a list of integers, got {value!r}")

    def refuse(self, *names: str) -> None:
        """Fields taxiway does not implement: set, they get a 400 rather than being ignored."""
        for name in names:
            value = self.data.get(name)
            if value not in (None, False, {}, [], ""):
                raise BadParam(name, f"{name} is not supported by this server")


def _check_range(name: str, value, lo, hi) -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if lo is not None and hi is not None else (
            f"at least {lo}" if lo is not None else f"at most {hi}")
        raise BadParam(name, f"{name} must be {bounds}, got {value!r}")
