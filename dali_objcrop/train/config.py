"""One configuration style for the trainer, the evaluations and the benchmarks.

A configuration is a dataclass; every field is a command-line flag, typed from
the dataclass, and unknown keys are rejected::

    --batch-size=64  --batch_size 64      # '-' or '_', '=value' or the next argument
    --compile        --compile=false      # a bare boolean flag means true
    --seeds=0,1,2    --seeds 0 1 2        # list / tuple fields: commas or following arguments
    --seed=none                           # Optional fields
    --config=FILE.json                    # a JSON object of fields first; later flags override it
    --help                                # the fields, their types, defaults and comments

Several dataclasses can share one command line (:func:`parse_configs`): each
key goes to the class that has the field.  :func:`config_dict` is what goes
into checkpoints and result JSON files (``dataclasses.asdict``), and a saved
dict parses back with ``--config``.

No dependency beyond the standard library (benchmarks without torch use it too).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
import sys
import types
import typing
from typing import Any, Sequence, TypeVar

T = TypeVar("T")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ConfigError(ValueError):
    """A bad command line or configuration: an unknown key, a badly typed or invalid value."""


class HelpRequested(SystemExit):
    """Raised (exit code 0) after ``--help`` printed the fields."""


def _unwrap_optional(typ) -> tuple[Any, bool]:
    """``X | None`` -> ``(X, True)``; anything else -> ``(typ, False)``."""
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(typ)) == 2:
            return args[0], True
    return typ, False


def _is_sequence(typ) -> bool:
    return typing.get_origin(_unwrap_optional(typ)[0]) in (list, tuple)


def _is_bool(typ) -> bool:
    return _unwrap_optional(typ)[0] is bool


def convert(name: str, typ, value) -> object:
    """``value`` (a flag's text or a JSON value) as the field's type; :class:`ConfigError` naming the flag otherwise."""
    base, optional = _unwrap_optional(typ)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
        return None
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        args = typing.get_args(base)
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):  # "a,b" and ["a", "b"] and ["a,b"] alike (items hold no commas)
            items = [p for v in value for p in (v.split(",") if isinstance(v, str) else [v]) if p != ""]
        else:
            raise ConfigError(f"--{name} expects a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:  # fixed-length tuple[X, Y]
            if len(items) != len(args):
                raise ConfigError(f"--{name} expects {len(args)} values, got {items!r}")
            return tuple(convert(name, a, v) for a, v in zip(args, items))
        elem = args[0] if args else str
        out = [convert(name, elem, v) for v in items]
        return tuple(out) if origin is tuple else out
    if base is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in _TRUE:
            return True
        if str(value).lower() in _FALSE:
            return False
        raise ConfigError(f"--{name} expects a boolean (true/false), got {value!r}")
    try:
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if base in (int, float) and isinstance(value, bool):
            raise ValueError
        out = base(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} expects {getattr(base, '__name__', base)}, got {value!r}") from None
    if base is float and out != out:   # nan: never a setting (every comparison with it is False)
        raise ConfigError(f"--{name} expects a number, got {value!r}")
    return out


def _tokens(argv: Sequence[str], field_types: dict[str, Any]) -> list[tuple[str, object]]:
    """``argv`` as ``(key, raw value)`` pairs; keys with ``-`` turned into ``_``."""
    pairs: list[tuple[str, object]] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            pairs.append(("help", True))
            i += 1
            continue
        if not a.startswith("--"):
            raise ConfigError(f"unexpected argument {a!r} (settings are --field=value)")
        key, eq, val = a[2:].partition("=")
        key = key.replace("-", "_")
        typ = field_types.get(key)
        if not eq:
            has_next = i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if typ is not None and _is_sequence(typ):
                val = []                              # --seeds 0 1 2 (nothing after it: an empty list)
                while i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    val.append(argv[i + 1])
                    i += 1
            elif typ is not None and _is_bool(typ) and not has_next:
                val = "true"                          # --compile
            elif has_next:
                val, i = argv[i + 1], i + 1           # --steps 7
            else:
                raise ConfigError(f"--{key.replace('_', '-')} needs a value")
        pairs.append((key, val))
        i += 1
    return pairs


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _as_instance(c):
    return c() if isinstance(c, type) else c


def parse_configs(configs: Sequence[Any], argv: Sequence[str] | None = None,
                  required: Sequence[str] = ()) -> list[Any]:
    """Several dataclass configurations from one command line.

    Args:
        configs: dataclass types (their defaults) or instances (their values as the defaults).
        argv: the flags (default ``sys.argv[1:]``).
        required: fields that must be given (by a flag or the ``--config`` file).

    Returns:
        One new instance per entry of ``configs``, in order.

    Raises:
        ConfigError: an unknown key (flag or ``--config`` file), a badly typed value, a field in two classes
            (``ValueError`` from a dataclass's own ``__post_init__`` checks passes through).
        HelpRequested: after printing the fields for ``--help``.
    """
    bases = [_as_instance(c) for c in configs]
    owner: dict[str, int] = {}
    field_types: dict[str, Any] = {}
    for k, b in enumerate(bases):
        for name, typ in _field_types(type(b)).items():
            if name in owner:
                raise ConfigError(f"field {name!r} is in both {type(bases[owner[name]]).__name__} and "
                                 f"{type(b).__name__}")
            owner[name], field_types[name] = k, typ
    pairs = _tokens(list(sys.argv[1:] if argv is None else argv), field_types)
    if any(k == "help" and "help" not in field_types for k, _ in pairs):
        print(config_help(bases))
        raise HelpRequested(0)
    values: dict[str, object] = {}
    for key, val in pairs:
        if key != "config" or "config" in field_types:
            continue
        try:
            with open(str(val)) as f:
                loaded = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read config file {val}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {val} must hold a JSON object")
        for k, v in loaded.items():
            if k not in field_types:
                raise ConfigError(f"unknown config key {k!r} in {val}; known: {sorted(field_types)}")
            values[k] = convert(k, field_types[k], v)
    for key, val in pairs:
        if key == "config" and "config" not in field_types:
            continue
        if key not in field_types:
            raise ConfigError(f"unknown flag --{key.replace('_', '-')}; known: "
                             f"{', '.join('--' + k.replace('_', '-') for k in sorted(field_types))}")
        values[key] = convert(key, field_types[key], val)
    missing = [k for k in required if k not in values]
    if missing:
        raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in missing)} required")
    out = []
    for k, b in enumerate(bases):
        mine = {n: v for n, v in values.items() if owner[n] == k}
        out.append(dataclasses.replace(b, **mine))
    return out


def parse_config(config: type[T] | T, argv: Sequence[str] | None = None) -> T:
    """One dataclass configuration from the command line (see :func:`parse_configs`)."""
    return parse_configs([config], argv)[0]


def config_dict(config) -> dict:
    """The configuration as a JSON-ready dict (what checkpoints and result files store)."""
    return dataclasses.asdict(config)


def _comments(cls) -> dict[str, str]:
    """``name: type = default  # comment`` lines of the class body, for ``--help``."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        m = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def config_help(configs: Sequence[Any]) -> str:
    """Every field of ``configs``: ``--name=default  (type)  comment``."""
    lines = ["usage: [--config=FILE.json] [--field=value ...]  ('-' or '_'; --field value; lists as a,b,c "
             "or several arguments)"]
    for b in (_as_instance(c) for c in configs):
        cls = type(b)
        doc = (cls.__doc__ or "").strip().splitlines()
        lines.append(f"{cls.__name__}: {doc[0] if doc else ''}")
        notes = _comments(cls)
        for name, typ in _field_types(cls).items():
            default = getattr(b, name)
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            tname = typ.__name__ if isinstance(typ, type) else str(typ).replace("typing.", "")
            lines.append(f"  --{name.replace('_', '-')}={shown}  ({tname})  {notes.get(name, '')}".rstrip())
    return "\n".join(lines)


def parse_or_exit(configs: Sequence[Any], argv: Sequence[str] | None = None, prog: str = "",
                  required: Sequence[str] = ()) -> list[Any]:
    """:func:`parse_configs` for a ``main``: a bad setting prints ``PROG: error: ...`` and exits 2 (no traceback)."""
    try:
        return parse_configs(configs, argv, required)
    except ConfigError as e:
        print(f"{prog or sys.argv[0]}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
