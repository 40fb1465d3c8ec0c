"""Which fields of a config the code reads (test support for tests/test_config_fields.py).

`record_reads()` patches `ConfigModel.__getattribute__` for the length of a `with` block and yields a `ReadLog`: per
config instance, the names of the fields that were read. A read is not a use when pydantic or `cambium/core/config.py`
is among the few frames above it: validators (called by pydantic while a config loads), `model_dump`, `fingerprint`,
`to_toml`, equality and the like touch fields without using them.

`leaves(root)` lists the leaf values of a config by dotted path from the root (`data.mixture.datasets[1].weight`): a
field holding a sub-model, or a non-empty tuple of sub-models, is no leaf itself; it is used when something inside it
is read, which is the same thing whether the sub-model is read where it sits or passed on and read elsewhere (reads are
logged per instance, not per access path).
"""

from __future__ import annotations

import sys
import threading
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import pydantic
import pydantic_core

import cambium.core.config as core_config
from cambium.core.config import ConfigModel

__all__ = ["Leaf", "ReadLog", "class_name", "leaves", "record_reads"]

# Frames from these files read fields to dump, compare or validate a config, not to use it.
_NOT_USES = (
    str(Path(pydantic.__file__).parent),
    str(Path(pydantic_core.__file__).parent),
    str(Path(core_config.__file__)),
    str(Path(__file__)),
)


class ReadLog:
    """Field names read, per config instance (the instances are kept alive, so that ids stay unique)."""

    def __init__(self) -> None:
        self._read: dict[int, set[str]] = {}
        self._alive: dict[int, ConfigModel] = {}
        self._lock = threading.Lock()

    def note(self, obj: ConfigModel, name: str) -> None:
        key = id(obj)
        with self._lock:
            self._alive[key] = obj
            self._read.setdefault(key, set()).add(name)

    def fields_read(self, obj: ConfigModel) -> set[str]:
        return self._read.get(id(obj), set())

    def fields_read_anywhere(self) -> set[tuple[str, str]]:
        """(class, field) of every read, whichever instance it was of (classes as `module.qualname`)."""
        return {(class_name(type(self._alive[key])), name) for key, names in self._read.items() for name in names}


def _is_use(frame: FrameType | None, depth: int = 6) -> bool:
    """False when one of the `depth` frames from `frame` up is pydantic's or core/config.py's: a validator (with the
    helpers it calls) runs under pydantic, a dump under pydantic or core/config.py."""
    for _ in range(depth):
        if frame is None:
            return True
        if frame.f_code.co_filename.startswith(_NOT_USES):
            return False
        frame = frame.f_back
    return True


@contextmanager
def record_reads() -> Iterator[ReadLog]:
    """Log the field reads of every `ConfigModel` instance while the block runs (any thread)."""
    log = ReadLog()
    plain = object.__getattribute__

    def getattribute(self: ConfigModel, name: str) -> Any:
        value = plain(self, name)
        if name in type(self).__pydantic_fields__ and _is_use(sys._getframe(1)):
            log.note(self, name)
        return value

    if "__getattribute__" in ConfigModel.__dict__:
        raise RuntimeError("record_reads() blocks do not nest")
    ConfigModel.__getattribute__ = getattribute
    try:
        yield log
    finally:
        del ConfigModel.__getattribute__


@dataclass(frozen=True)
class Leaf:
    """A leaf value of a config: its dotted path, the instance holding it and its field name."""

    path: str
    owner: ConfigModel
    name: str

    @property
    def field(self) -> tuple[str, str]:
        """(class, field) of the leaf, as `ReadLog.fields_read_anywhere` names them."""
        return class_name(type(self.owner)), self.name

    @property
    def value(self) -> Any:
        return vars(self.owner)[self.name]

    @property
    def is_default(self) -> bool:
        """Whether the value equals the field's default (a required field has none)."""
        info = type(self.owner).__pydantic_fields__[self.name]
        if info.is_required():
            return False
        return bool(self.value == info.get_default(call_default_factory=True))

    @property
    def is_tag(self) -> bool:
        """A `Literal` of one value (the `kind` of a union member): choosing the class is its only use."""
        annotation = type(self.owner).__pydantic_fields__[self.name].annotation
        return typing.get_origin(annotation) is typing.Literal and len(typing.get_args(annotation)) == 1


def class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def leaves(model: ConfigModel, prefix: str = "") -> Iterator[Leaf]:
    values = vars(model)
    for name in type(model).__pydantic_fields__:
        value, path = values[name], f"{prefix}{name}"
        if isinstance(value, ConfigModel):
            yield from leaves(value, f"{path}.")
        elif isinstance(value, tuple | list) and value and all(isinstance(v, ConfigModel) for v in value):
            for i, item in enumerate(value):
                yield from leaves(item, f"{path}[{i}].")
        else:
            assert not isinstance(value, pydantic.BaseModel), f"{path}: a sub-model that is no ConfigModel"
            assert not (isinstance(value, dict) and any(isinstance(v, pydantic.BaseModel) for v in value.values())), \
                f"{path}: a table of sub-models (not handled)"
            yield Leaf(path, model, name)
