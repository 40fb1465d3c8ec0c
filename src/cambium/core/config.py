"""TOML configs validated by frozen pydantic v2 models.

Each system defines its config as `ConfigModel` subclasses (every field with a description, which doubles as help
text) and loads it with `load(path, Model, overrides)`. Validation is strict in JSON mode: TOML's own types must match
the field types (an int is accepted where a float is expected, a string is never a number), lists become tuples, and
unknown keys are rejected. Errors name the dotted path, the offending value and what was expected, e.g.
``configs/moe/tiny.toml: model.moe.top_k=9: must be <= n_routed_experts=8``.

`--set a.b=c` overrides are typed by the model: where the field is a string (or a path, or a string enum) the text is
taken as it is, unless it starts with a quote, when it is read as a TOML string (`out/x` and `"out/x"` are the same);
otherwise it is parsed as a TOML value (`3`, `1e-3`, `true`, `[1, 2]`, `"text"`).

Every integer, wherever it sits in a config, must fit in 64 bits (TOML's own range): a larger one would pass pydantic
and overflow later in numpy or torch, so `validate` refuses it with its key.
"""

from __future__ import annotations

import difflib
import enum
import hashlib
import json
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import tomli_w
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

from cambium.core.errors import ConfigError

__all__ = [
    "RESUME_SAFE", "ConfigModel", "changed_keys", "fingerprint", "is_resume_safe", "load", "load_data",
    "parse_overrides", "resume_fingerprint", "to_toml", "validate",
]

# Marks a field that a resumed run may change (`Field(..., json_schema_extra=RESUME_SAFE)`): how long to train,
# how often to log, evaluate and checkpoint, where to run. Every other key is part of what a checkpoint was made of.
RESUME_SAFE: dict[str, Any] = {"resume_safe": True}

M = TypeVar("M", bound=BaseModel)


class ConfigModel(BaseModel):
    """Base of every config model: frozen, strict, unknown keys rejected.

    `unbuilt` maps the keys of planned features that do not exist yet to what will build them: a file or an override
    that sets one is refused with "not built yet", where an unknown key would only be called unknown (and a field
    kept for later would be accepted and ignored).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)
    unbuilt: ClassVar[Mapping[str, str]] = {}


def load(path: str | Path, model: type[M], overrides: Sequence[str] = ()) -> M:
    """Read the TOML file at `path`, apply `--set` style `overrides` and validate against `model`.

    Raises ConfigError naming the file, the dotted path and the offending value.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass the path of a .toml file (see configs/)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text: {exc}") from None
    return validate(data, model, overrides, source=str(path))


def load_data(data: Mapping[str, Any], model: type[M], overrides: Sequence[str] = ()) -> M:
    """Validate an in-memory mapping (e.g. a resolved config read back from a run) like `load` does."""
    return validate(dict(data), model, overrides, source="<config>")


def validate(data: dict[str, Any], model: type[M], overrides: Sequence[str] = (), *, source: str) -> M:
    data = _deepcopy_tables(data)
    for path, value in parse_overrides(overrides, model):
        _set_path(data, path, value)
    _check_int64(data, [], source)
    try:
        return model.model_validate_json(json.dumps(data, default=str))
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_describe(err, model) for err in exc.errors())) from None
    except ValueError as exc:  # e.g. JSON nesting deeper than the parser allows
        raise ConfigError(f"{source}: cannot validate the config: {exc}") from None


_INT64 = (-(2**63), 2**63 - 1)


def _check_int64(value: Any, path: list[str], source: str) -> None:
    """Refuse an integer outside int64 anywhere in the raw data (TOML integers are 64-bit)."""
    if isinstance(value, dict):
        for key, item in value.items():
            _check_int64(item, [*path, str(key)], source)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_int64(item, [*path, str(index)], source)
    elif isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        text = str(value) if len(str(value)) <= 40 else f"{str(value)[:37]}..."
        raise ConfigError(f"{source}: {'.'.join(path) or '<root>'}={text}: integer out of range (must fit in 64 bits, "
                          f"{_INT64[0]} to {_INT64[1]})")


def parse_overrides(overrides: Iterable[str], model: type[BaseModel]) -> list[tuple[list[str], Any]]:
    """Turn `a.b=c` strings into (path, typed value) pairs, checking that the path exists in `model`."""
    parsed: list[tuple[list[str], Any]] = []
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {text!r} is not of the form section.key=value")
        path = key.split(".")
        annotation = _annotation_at(model, path)
        if _takes_text(annotation):
            value: Any = _parse_text(key, raw)
        elif bool in _unwrap(annotation) and raw.strip().lower() in ("true", "false"):
            value = raw.strip().lower() == "true"  # TOML spells booleans in lower case; `True` is meant the same
        else:
            value = _parse_toml_value(raw)
        parsed.append((path, value))
    return parsed


def to_toml(cfg: BaseModel) -> str:
    """The resolved config as TOML text (None values are left out; TOML has no null)."""
    return tomli_w.dumps(_drop_none(cfg.model_dump(mode="json")))


def fingerprint(cfg: BaseModel) -> str:
    """sha256 of the config's canonical JSON: equal configs have equal fingerprints, whatever the key order."""
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def changed_keys(old: BaseModel, new: BaseModel) -> list[str]:
    """Dotted paths of the leaf values that differ between two configs of the same model."""
    out: list[str] = []
    _diff(old.model_dump(mode="json"), new.model_dump(mode="json"), [], out)
    return out


def is_resume_safe(model: type[BaseModel], dotted: str) -> bool:
    """True if the field at `dotted` (or a table above it) is marked RESUME_SAFE."""
    current: type[BaseModel] | None = model
    for part in dotted.split("."):
        if current is None or part not in current.model_fields:
            return False
        field = current.model_fields[part]
        if _marked_safe(field):
            return True
        current = _model_in(field.annotation)
    return False


def resume_fingerprint(cfg: BaseModel) -> str:
    """The fingerprint of everything a resumed run may not change: the config without its RESUME_SAFE fields."""
    data = cfg.model_dump(mode="json")
    _drop_safe(type(cfg), data)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _marked_safe(field: FieldInfo) -> bool:
    return isinstance(field.json_schema_extra, dict) and bool(field.json_schema_extra.get("resume_safe"))


def _diff(old: Any, new: Any, path: list[str], out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            _diff(old.get(key), new.get(key), [*path, key], out)
    elif old != new:
        out.append(".".join(path))


def _drop_safe(model: type[BaseModel], data: dict[str, Any]) -> None:
    for name, field in model.model_fields.items():
        if _marked_safe(field):
            data.pop(name, None)
            continue
        sub = _model_in(field.annotation)
        if sub is not None and isinstance(data.get(name), dict):
            _drop_safe(sub, data[name])


def _describe(err: Any, model: type[BaseModel]) -> str:
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc) or "<root>"
    kind = err["type"]
    if kind == "extra_forbidden":
        reason = _unbuilt(_model_at(model, loc[:-1]), loc[-1])
        if reason is not None:
            return f"{dotted}: not built yet ({reason}); remove it"
        known = _known_keys(model, loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"{dotted}: unknown key ({hint}known keys here: {', '.join(sorted(known))})"
    if kind == "missing":
        return f"{dotted}: required key is missing"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return f"{dotted}={_short(err.get('input'))}: {msg}"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _deepcopy_tables(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy_tables(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy_tables(v) for v in data]
    return data


def _set_path(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part!r} holds a value, not a table")
        node = child
    node[path[-1]] = value


def _parse_text(key: str, raw: str) -> str:
    """The value of a text field: as it is, or a TOML string when it starts with a quote (`"out/x"` is `out/x`)."""
    if not raw.strip().startswith(('"', "'")):
        return raw
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"override {key}={raw}: a value that starts with a quote must be one TOML string "
                          f"({exc}); drop the quotes to pass the text as it is") from None
    return str(value)  # a TOML value that starts with a quote is a string


def _parse_toml_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _unwrap(annotation: Any) -> list[Any]:
    """The concrete alternatives of an annotation (Optional/Union/Annotated peeled off)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            if arg is not type(None):
                out.extend(_unwrap(arg))
        return out
    return [annotation]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    for alt in _unwrap(annotation):
        if isinstance(alt, type) and issubclass(alt, BaseModel):
            return alt
    return None


def _annotation_at(model: type[BaseModel], path: list[str]) -> Any:
    current: type[BaseModel] | None = model
    annotation: Any = None
    for i, part in enumerate(path):
        if current is None:
            # Inside a free-form table (e.g. dict[str, float]): no type information further down.
            return None
        fields = current.model_fields
        if part not in fields:
            reason = _unbuilt(current, part)
            if reason is not None:
                raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])!r} is not built yet ({reason})")
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"override {'.'.join(path)}: unknown key {'.'.join(path[: i + 1])!r} "
                f"({hint}known keys here: {', '.join(sorted(fields))})"
            )
        annotation = fields[part].annotation
        current = _model_in(annotation)
        if current is None and i < len(path) - 1 and typing.get_origin(annotation) is not dict:
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])!r} is a value, not a table")
    return annotation


def _takes_text(annotation: Any) -> bool:
    alts = _unwrap(annotation)
    if not alts or annotation is None:
        return False
    for alt in alts:
        if alt is str or alt is Path:
            continue
        if isinstance(alt, type) and issubclass(alt, enum.Enum) and all(isinstance(m.value, str) for m in alt):
            continue
        if typing.get_origin(alt) is typing.Literal and all(isinstance(a, str) for a in typing.get_args(alt)):
            continue
        return False
    return True


def _model_at(model: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The model of the table at `loc` (None: not a table, or inside a list)."""
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None or part not in current.model_fields:
            return None
        current = _model_in(current.model_fields[part].annotation)
    return current


def _unbuilt(model: type[BaseModel] | None, key: str) -> str | None:
    """What will build `key` if it is a planned key of `model` (see `ConfigModel.unbuilt`), else None."""
    if model is None or not issubclass(model, ConfigModel):
        return None
    return model.unbuilt.get(key)


def _known_keys(model: type[BaseModel], loc: list[str]) -> list[str]:
    current = _model_at(model, loc)
    return list(current.model_fields) if current is not None else []


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value
