"""Checks of the zero-shot evaluation inputs that need no model: used by the pre-flight, so that a run does not
fail at its first evaluation, possibly hours in. Plain arguments in, :class:`rankclip_ds.problems.Problem` out."""

from __future__ import annotations

from ..problems import Problem
from .datasets import resolve_classnames
from .templates import resolve_templates

__all__ = ["check_zeroshot_inputs"]


def check_zeroshot_inputs(data: str, classnames: str | None, templates: str) -> list[Problem]:
    """The labelled data (``eval.zeroshot_data``), its class names and the templates exist and read."""
    problems = []
    try:
        names = resolve_classnames(data, classnames)
    except (OSError, ValueError) as exc:
        if classnames and "classnames file" in str(exc):
            key, value = "eval.classnames", classnames
            fix = "write that file (one class name per line, line i = label i), or set eval.classnames=null"
        else:
            key, value = "eval.zeroshot_data", data
            fix = (
                "point it at labelled shards (.cls) or an ImageFolder directory, with a classnames file (one name "
                "per line, line i = label i), or set eval.zeroshot_data=null"
            )
        problems.append(Problem.of(key, value, str(exc).split("; ", 1)[0].split(". Fix:", 1)[0], fix, machine=True))
    else:
        if names is None:
            problems.append(
                Problem.of(
                    "eval.classnames",
                    classnames,
                    f"zero-shot classification needs class names, and there is no classnames.txt beside the "
                    f"shards of eval.zeroshot_data={data!r}",
                    "set eval.classnames=FILE (one name per line, line i = label i)",
                    machine=True,
                )
            )
    try:
        resolve_templates(templates)
    except (OSError, ValueError) as exc:
        problems.append(
            Problem.of(
                "eval.templates",
                templates,
                str(exc).split(". Fix:", 1)[0],
                "use 'openai', one template with {} (e.g. 'a photo of a {}.'), or an existing file",
                machine=True,
            )
        )
    return problems
