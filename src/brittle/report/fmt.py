"""The one way a number is written in a report, and the cleaning that makes results JSON-safe.

Every number the report shows goes through :func:`fmt`, and ``results.json`` holds the same values (cleaned by
:func:`clean` *before* rendering), so ``fmt(value)`` of any number in ``results.json`` is a token of
``report.md`` (:func:`number_tokens` splits a text into such tokens; the tests check this).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

DASH = "—"

_TOKEN = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[-+]\d+)?")


def fmt(x: Any) -> str:
    """A number as the report writes it: integers with thousands separators (``1,061,550``); floats with 4
    significant digits between 0.001 and 10,000 (``0.5833``, ``29.51``, ``1``), else 3 significant digits
    (``1.43e+07``, ``0.000205``, ``6.9e-06``); ``0`` for zero; ``—`` for None and NaN. Anything else is ``str``."""
    if x is None:
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return DASH
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if x == 0:
            return "0"
        a = abs(x)
        s = f"{x:.4g}" if 1e-3 <= a < 1e4 else f"{x:.3g}"
        return s
    return str(x)


def fmt_p(p: Any) -> str:
    """A p-value: as :func:`fmt`, and an exact 0 (the tail underflowed a double) marked as below 1e-300."""
    return "0 (< 1e-300, underflow)" if isinstance(p, (int, float)) and not isinstance(p, bool) and p == 0 else fmt(p)


def fmt_ci(lo: Any, hi: Any) -> str:
    """``[lo, hi]`` (both through :func:`fmt`); ``—`` when either is missing."""
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)) or (isinstance(hi, float) and math.isnan(hi)):
        return DASH
    return f"[{fmt(lo)}, {fmt(hi)}]"


def fmt_value(v: Any) -> str:
    """A setting's value: numbers through :func:`fmt`, lists as ``[a, b]``, mappings as ``k=v``."""
    if isinstance(v, Mapping):
        return ", ".join(f"{k}={fmt_value(x)}" for k, x in v.items()) or "{}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(fmt_value(x) for x in v) + "]"
    if v is None:
        return "none"
    return fmt(v)


def clean(obj: Any) -> Any:
    """A JSON-safe copy: numpy scalars and arrays become Python numbers and lists, NaN and infinities None, paths
    and other objects strings; mapping keys strings."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        np = None
    if isinstance(obj, Mapping):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if np is not None:
        if isinstance(obj, np.ndarray):
            return [clean(v) for v in obj.tolist()]
        if isinstance(obj, np.bool_):
            return bool(obj)
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            obj = float(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return str(obj)


def numbers(obj: Any, path: str = "") -> list[tuple[str, int | float]]:
    """Every number (not bool) in a cleaned results tree, with its path (``a.b[2].c``)."""
    out: list[tuple[str, int | float]] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out += numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out.append((path, obj))
    return out


def number_tokens(text: str) -> set[str]:
    """The number-like tokens of a text, as :func:`fmt` writes them."""
    return set(_TOKEN.findall(text))
