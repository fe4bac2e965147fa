"""Settings as dataclasses: the schema tools the run config and every method's settings share.

A field's type gives its YAML coercion and its flag type; `setting(...)` adds what validation and resume need
(choices, bounds, whether a resumed run may change it) as field metadata; the comment beside the field, or
the comment block above it, is its help text (`field_help`). So flags, YAML loading, validation, `--help` and
the resume comparison are all read off the dataclasses, and a method's settings are named in its file only.
Nothing here imports torch: `dcfast --help` stays fast.
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import re
import tokenize
import typing
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union


def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            choices: Optional[Sequence[str]] = None, at_least: Optional[int] = None, positive: bool = False,
            nonnegative: bool = False, resumable: bool = False) -> Any:
    """A dataclass field with its checks: `choices`, an integer `at_least`, a number > 0 (`positive`) or >= 0
    (`nonnegative`); None passes them where the type is Optional. `resumable`: a resumed run may change it."""
    metadata = {"choices": tuple(choices) if choices else None, "at_least": at_least, "positive": positive,
                "nonnegative": nonnegative, "resumable": resumable}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


@dataclass
class MethodSettings:
    """The settings one method reads, beside the run config's shared fields; a method without any uses this."""

    def problems(self, config) -> List[str]:
        """Problems no field's own check sees (a range, a combination with the run `config`'s shared fields), as
        'field: what is wrong; the fix'."""
        return []


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def field_problems(obj: Any) -> List[str]:
    """Every `setting(...)` check and bool type of `obj`'s fields, as 'field: what is wrong'."""
    found = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if value is None and type(None) in typing.get_args(hints[f.name]):
            continue
        if hints[f.name] is bool and not isinstance(value, bool):
            found.append(f"{f.name}: must be true or false, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            unset = "; or leave it unset" if type(None) in typing.get_args(hints[f.name]) else ""
            found.append(f"{f.name}: {value!r} is not one of {', '.join(meta['choices'])}{unset}")
        if meta.get("at_least") is not None and (not _is_int(value) or value < meta["at_least"]):
            found.append(f"{f.name}: must be an integer >= {meta['at_least']}, got {value!r}")
        if meta.get("positive") and (not is_number(value) or value <= 0):
            found.append(f"{f.name}: must be a number > 0, got {value!r}")
        if meta.get("nonnegative") and (not is_number(value) or value < 0):
            found.append(f"{f.name}: must be a number >= 0, got {value!r}")
    return found


def resumable(cls: type, name: str) -> bool:
    return bool(cls.__dataclass_fields__[name].metadata.get("resumable"))


def build(cls: type, values: Dict[str, Any]) -> Any:
    """`cls(**values)` with each value coerced to its field's type; unknown names raise, listing the known."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} of {cls.__name__}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: coerce(name, hints[name], value, cls) for name, value in values.items()})


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_TRUE, _FALSE = ("true",), ("false",)


def coerce(name: str, hint: Any, value: Any, owner: Optional[type] = None) -> Any:
    """`value` as field `name` of type `hint` wants it; TypeError naming the field, the value and the fix.

    Numbers written as text ("1e-4", "200") become numbers; true/false text becomes a bool. YAML 1.1 reads a
    bare `no` as false: for a choice field that accepts "no" (mixed_precision) false means "no".
    """
    optional = type(None) in typing.get_args(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if optional and len(args) == 1 else hint
    field_ = owner.__dataclass_fields__.get(name) if owner is not None else None
    if value is None:
        if optional:
            return None
        raise TypeError(f"{name}: must be set (it cannot be null); remove the key to keep the default")
    if typing.get_origin(base) is Union:  # temperature: a number or "auto"
        return _number_from(value) if _looks_numeric(value) else value
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise TypeError(f"{name}: must be true or false, got {value!r}")
    if base in (int, float):
        if _looks_numeric(value):
            number = _number_from(value)
            if base is float:
                return number
            if float(number).is_integer():
                return int(number)
        kind = "an integer" if base is int else "a number"
        example = f"; e.g. {name}: {default_of(field_)!r}" if field_ is not None else ""
        raise TypeError(f"{name}: must be {kind}, got {value!r}" + (" (text)" if isinstance(value, str) else "")
                        + example)
    if base is str:
        choices = (field_.metadata.get("choices") or ()) if field_ is not None else ()
        if isinstance(value, bool) and not value and "no" in choices:
            return "no"
        if not isinstance(value, str):
            raise TypeError(f"{name}: must be text, got {value!r} ({type(value).__name__}); put it in quotes in YAML")
        return value
    if typing.get_origin(base) in (list, List) and typing.get_args(base) == (str,):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise TypeError(f"{name}: must be a list of names, e.g. [to_q, to_k, to_v, to_out.0], got {value!r}")
        return list(value)
    return value  # tasks, method_settings: checked by their owners


def _looks_numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            float(value)
            return value.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")
        except ValueError:
            return False
    return False


def _number_from(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        return int(text) if re.fullmatch(r"[+-]?\d+", text) else float(text)
    return value


def field_help(cls: type) -> Dict[str, str]:
    """Each field's help text: the comment beside it (with its indented continuation lines), else the comment
    block right above it. Read from the source of `cls` and of the dataclasses it inherits fields from, so the
    help is the reason in the code."""
    helps: Dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass) and klass is not object:
            helps.update(_own_field_help(klass))
    return helps


def _own_field_help(cls: type) -> Dict[str, str]:
    source = inspect.getsource(cls)
    comments = {tok.start[0]: tok.string.lstrip("#").rstrip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    names = set(cls.__dict__.get("__annotations__", {}))
    helps: Dict[str, str] = {}
    block: List[str] = []
    last = None
    for number, line in enumerate(source.splitlines(), start=1):
        match = re.match(r"    (\w+)\s*:", line)
        stripped = line.strip()
        if match and match.group(1) in names:
            last = match.group(1)
            inline = comments.get(number) if not stripped.startswith("#") else None
            helps[last] = (inline or " ".join(block)).strip()
            block = []
        elif stripped.startswith("#"):
            text = comments[number]
            if text.startswith("   ") and last is not None and not block:  # continuation of the field above
                helps[last] += " " + text.strip()
            else:
                block.append(text.strip())
        else:
            block, last = [], (None if not stripped else last)
    return helps
