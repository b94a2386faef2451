"""How a configuration mistake is told: one message form, one exception, one record for the pre-flight's list.

Every user-facing configuration error names the key, the bad value and the fix, in one form written by
:func:`problem_message`: ``key=value: problem. Fix: fix``.  A value that is wrong on its own fails at once
(:func:`fail`, raising :class:`ConfigError`: the config sections' ``__post_init__``); the pre-flight collects
:class:`Problem` records from every check and raises them together (:func:`format_problems`).  Nothing here
imports the rest of the package, so the config, the model, the data and the pre-flight all use it.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigError", "Problem", "check_positive", "fail", "format_problems", "problem_message", "suggest"]


class ConfigError(ValueError):
    """A configuration mistake; the message names the key, the value and the fix."""


def problem_message(key: str, value: Any, problem: str, fix: str) -> str:
    """The one message form: ``key=value: problem. Fix: fix``."""
    return f"{key}={value!r}: {problem}. Fix: {fix}"


def fail(key: str, value: Any, problem: str, fix: str) -> typing.NoReturn:
    """Raise :class:`ConfigError` with :func:`problem_message`."""
    raise ConfigError(problem_message(key, value, problem, fix))


def check_positive(section: str, name: str, value: float | int | None, *, allow_none: bool = False) -> None:
    """Fail unless ``section.name`` is > 0 (or None, when allowed)."""
    if value is None and allow_none:
        return
    if value is None or not value > 0:
        fail(f"{section}.{name}", value, "must be > 0", f"set {section}.{name} to a positive number")


def suggest(name: str, choices: list[str], n: int = 2) -> str:
    """``"; did you mean 'x'?"`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.75)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""


@dataclass(frozen=True)
class Problem:
    """One mistake found by the pre-flight."""

    field: str
    """The dotted config key (``data.train_data``) or JSON field (``zero_optimization.stage in ds.json``)."""
    message: str
    """``field=value: problem. Fix: ...``: what is wrong and what to do."""
    machine: bool = False
    """True when the problem is about this machine (files, devices) rather than the configuration itself: only a
    real run needs them, so a dry run reports them as notes instead of failing."""

    @classmethod
    def of(cls, key: str, value: Any, problem: str, fix: str, *, machine: bool = False) -> Problem:
        """The problem of config key ``key`` in the one message form."""
        return cls(key, problem_message(key, value, problem, fix), machine)


def format_problems(problems: list[Problem]) -> str:
    """One problem: its message. Several: a count, then one problem per line."""
    if len(problems) == 1:
        return problems[0].message
    return f"{len(problems)} problems found before starting:\n" + "\n".join(f"  - {p.message}" for p in problems)
