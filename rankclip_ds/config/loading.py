"""Typed loading of the config: defaults < YAML < ``--section.key value`` overrides, dumping, field docs."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ..problems import ConfigError, fail
from .sections import Config

__all__ = [
    "config_from_dict",
    "config_to_dict",
    "describe_fields",
    "dump_config",
    "field_docs",
    "load_config",
    "parse_overrides",
    "save_config",
    "section_from_dict",
]

SectionT = typing.TypeVar("SectionT")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` (from YAML or the command line) to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, args, key)
    if origin is Literal:
        return _coerce_literal(value, args, key)
    if dataclasses.is_dataclass(tp):
        return _coerce_section(value, tp, key)
    if origin is tuple:
        return _coerce_tuple(value, args, key)
    if origin is list:
        return _coerce_list(value, args[0], key)
    if origin is dict:
        return _coerce_dict(value, key)
    if tp is Any:
        return value
    if tp is bool:
        return _coerce_bool(value, key)
    if tp is int:
        return _coerce_int(value, key)
    if tp is float:
        return _coerce_float(value, key)
    if tp is str:
        return _coerce_str(value, key)
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this module, not a user error


def _coerce_union(value: Any, tp: Any, args: tuple, key: str) -> Any:
    """``X | Y | None``: None when allowed, else the first member type that accepts ``value``."""
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError as exc:
            errors.append(str(exc))
    raise ConfigError(errors[0] if len(errors) == 1 else f"{key}={value!r}: expected {_type_name(tp)}")


def _coerce_literal(value: Any, args: tuple, key: str) -> Any:
    """``Literal[...]``: one of the listed values, with a "did you mean" hint otherwise."""
    if value not in args:
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {list(args)}"
        fail(key, value, f"is not one of {list(args)}", hint)
    return value


def _coerce_section(value: Any, cls: type, key: str) -> Any:
    """A nested dataclass: built from a mapping (a YAML section)."""
    if not isinstance(value, dict):
        fail(key, value, "must be a mapping (a YAML section)", f"write {key}: {{...}} with its fields")
    return _build(cls, value, key)


def _coerce_tuple(value: Any, args: tuple, key: str) -> tuple:
    """``tuple[A, B, ...]``: a list of exactly that many values, each coerced to its type."""
    if not isinstance(value, (list, tuple)) or len(value) != len(args):
        fail(key, value, f"must be a list of {len(args)} values", f"write e.g. {key}: [a, b]")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))


def _coerce_list(value: Any, item_tp: Any, key: str) -> list:
    """``list[T]``: a list (or tuple) whose items are coerced to ``T``."""
    if not isinstance(value, (list, tuple)):
        fail(key, value, "must be a list", f"write {key}: [..]")
    return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]


def _coerce_dict(value: Any, key: str) -> dict:
    """``dict[...]``: any mapping, copied; its values are not checked."""
    if not isinstance(value, dict):
        fail(key, value, "must be a mapping", f"write {key}: {{name: value}}")
    return dict(value)


def _coerce_bool(value: Any, key: str) -> bool:
    """A YAML boolean; no truthy numbers or strings."""
    if not isinstance(value, bool):
        fail(key, value, "must be true or false", f"write {key}: true")
    return value


def _coerce_int(value: Any, key: str) -> int:
    """An integer, or a float with no fractional part; never a boolean."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        fail(key, value, "must be an integer", f"write {key} as a whole number")
    return value


def _coerce_float(value: Any, key: str) -> float:
    """A number, or text Python parses as one; never a boolean."""
    if isinstance(value, str):
        # YAML 1.1 reads "5e-4" (no dot) as a string; accept any text Python parses as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(key, value, "must be a number", f"write {key} as a number, e.g. 5e-4")
    return float(value)


def _coerce_str(value: Any, key: str) -> str:
    """A string; an unquoted number (not a boolean) is turned into its text."""
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        fail(key, value, "must be a string", f"quote the value of {key}")
    return value


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


# Names users bring from other trainers (open_clip, timm, HF), mapped to ours for the "did you mean" hint.
_KEY_ALIASES = {
    "learning_rate": "lr",
    "wd": "weight_decay",
    "batch_size": "micro_batch_size",
    "accum_freq": "grad_accum_steps",
    "gradient_accumulation_steps": "grad_accum_steps",
    "warmup": "warmup_steps",
    "workers": "num_workers",
    "model": "name",
}


def _unknown_key(cls: type, name: str, prefix: str) -> typing.NoReturn:
    valid = list(_fields(cls))
    alias = _KEY_ALIASES.get(name)
    close = [alias] if alias in valid else difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    where = f"{prefix}." if prefix else ""
    hint = f"did you mean {where}{close[0]}?" if close else f"valid keys here: {', '.join(valid)}"
    raise ConfigError(f"unknown config key {where + name!r}: {hint}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in hints or name not in _fields(cls):
            _unknown_key(cls, str(name), prefix)
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive: dataclass construction errors
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from nested plain data."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(data).__name__}")
    return _build(Config, data)


def section_from_dict(cls: type[SectionT], data: Any, key: str) -> SectionT:
    """Build and validate one config section ``cls`` (e.g. :class:`~rankclip_ds.model.config.ModelConfig`) from
    nested plain data, alone: errors name the dotted keys under ``key`` (``model.image.name``) as in a whole
    config, and no other section is read or checked."""
    return _coerce(data, cls, key)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested data (tuples become lists) suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("model_kwargs", "overrides"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["--optim.lr", "1e-3", "--model.image.name=resnet50"]`` into nested data.

    Values are parsed as YAML scalars/flow collections (``true``, ``3``, ``[0.9, 1.0]``, ``null``); an argument
    that is not ``--section.key`` is an error.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(
                f"unexpected argument {arg!r}: overrides look like --section.key VALUE (e.g. --optim.lr 1e-3)"
            )
        if "=" in arg:
            dotted, raw = arg[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg!r} has no value: write {arg} VALUE")
            dotted, raw = arg[2:], args[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override --{dotted}: cannot parse value {raw!r} ({exc})") from exc
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override --{dotted} conflicts with an earlier override of --{part}")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < YAML ``path`` < ``--section.key value`` overrides, validated."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {str(path)!r}: no such file. Fix: pass an existing YAML, e.g. configs/")
        with p.open() as fh:
            try:
                loaded = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"--config {str(path)!r}: not valid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {str(path)!r}: the top level must be a mapping of sections")
        data = loaded
    if overrides:
        data = _deep_merge(data, parse_overrides(overrides))
    return config_from_dict(data)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def save_config(cfg: Config, path: str | Path) -> Path:
    """Write the resolved config (atomically: temp file + rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(dump_config(cfg))
    tmp.replace(p)
    return p


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it), read from the source; used by ``--help-config``."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def describe_fields(cls: type | None = None, prefix: str = "") -> str:
    """Every field of the config (``--section.key``), its default and its docstring: ``train.py --help-config``."""
    import dataclasses

    from .sections import Config

    cls = Config if cls is None else cls
    docs, hints, lines = field_docs(cls), typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(describe_fields(hints[f.name], f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"--{prefix}{f.name} (default {default!r})\n    {docs.get(f.name, '')}")
    return "\n".join(lines)
