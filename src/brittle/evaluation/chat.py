"""Chat-template helpers. Depends on nothing else in ``brittle.evaluation``, so any module can import it."""

from __future__ import annotations

from ..data.core import render_prompt


def no_system_prompt(tokenizer) -> str | None:
    """What "no system prompt" means for this template: ``""`` (an explicit empty system message) if the
    template inserts a default system prompt when none is given, else ``None`` (no system message)."""
    probe = "brittle probe"
    try:
        with_none = render_prompt(tokenizer, probe, None)
        with_empty = render_prompt(tokenizer, probe, "")
    except Exception:  # templates without a system role
        return None
    return "" if len(with_none) > len(with_empty) else None


__all__ = ["no_system_prompt"]
