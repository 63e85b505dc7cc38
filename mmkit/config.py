"""Strict dataclass configs: unknown keys are errors with a did-you-mean, defaults live only here.

Every mmkit config subclasses :class:`StrictConfig`::

    @dataclass
    class QFormerConfig(StrictConfig):
        num_queries: int = 32

    QFormerConfig.from_dict({"num_querys": 32})
    # ValueError: QFormerConfig: unknown key 'num_querys'; did you mean 'num_queries'? Accepted: ...
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import stat
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T", bound="StrictConfig")


def _unknown_key_error(cls_name: str, key: str, accepted: list[str]) -> ValueError:
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "."
    return ValueError(f"{cls_name}: unknown key '{key}'{hint} Accepted keys: {', '.join(sorted(accepted))}.")


@dataclasses.dataclass
class StrictConfig:
    """Base for typed configs. Construct with keywords or ``from_dict``; both reject unknown keys."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any], _defaults: dict[str, Any] | None = None) -> T:
        """Build from a plain dict (e.g. parsed JSON/YAML). Nested StrictConfig fields accept dicts; a partial
        section overrides that field's own default (e.g. a recipe's world), key by key down the nesting."""
        if not isinstance(data, dict):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        names = cls.field_names()
        for key in data:
            if key not in names:
                raise _unknown_key_error(cls.__name__, key, names)
        hints = typing.get_type_hints(cls)
        factories = {f.name: f.default_factory for f in dataclasses.fields(cls)
                     if f.default_factory is not dataclasses.MISSING}
        kwargs = {}
        for key, value in data.items():
            sub = _strict_config_type(hints.get(key))
            if sub is not None and isinstance(value, dict):
                # the default this section overrides: the enclosing default's, else this field's own factory's
                base = (_defaults or {}).get(key)
                if not isinstance(base, dict) and key in factories:
                    made = factories[key]()
                    base = made.to_dict() if isinstance(made, StrictConfig) else None
                value = sub.from_dict({**base, **value} if isinstance(base, dict) else value, base)
            elif isinstance(value, list) and _wants_tuple(hints.get(key)):
                value = tuple(value)
            else:
                value = _coerce_scalar(cls.__name__, key, hints.get(key), value)
            kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self: T, **changes: Any) -> T:
        names = self.field_names()
        for key in changes:
            if key not in names:
                raise _unknown_key_error(type(self).__name__, key, names)
        return dataclasses.replace(self, **changes)

    def save_json(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_json(cls: type[T], path: str | os.PathLike) -> T:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{cls.__name__}: config file not found: {path}") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{cls.__name__}: {path} is not valid JSON ({err})") from None
        return cls.from_dict(data)


def _strict_config_type(hint: Any) -> type[StrictConfig] | None:
    candidates = typing.get_args(hint) or (hint,)
    for c in candidates:
        if isinstance(c, type) and issubclass(c, StrictConfig):
            return c
    return None


def _coerce_scalar(owner: str, key: str, hint: Any, value: Any) -> Any:
    """Check a value against a simple annotation (int/float/bool/str, optionally | None).

    YAML reads ``1e-4`` as a string; a float field accepts such numeric strings. Anything else that
    does not fit raises with the field, the value and the expected type.
    """
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ValueError(f"{owner}.{key} may not be null")
    simple = [t for t in options if t in (int, float, bool, str)]
    if not simple or len(simple) != len([t for t in options if t is not type(None)]):
        return value  # containers and other types: left to the dataclass
    if any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in simple):
        if float in simple and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value
    if float in simple and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    if int in simple and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    expected = " or ".join(t.__name__ for t in simple)
    raise ValueError(f"{owner}.{key} expects {expected}, got {value!r} ({type(value).__name__})")


def _wants_tuple(hint: Any) -> bool:
    candidates = typing.get_args(hint) or (hint,)
    return any(typing.get_origin(c) is tuple or c is tuple for c in (hint, *candidates))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file so that a crash never leaves a half-written file behind."""
    atomic_write_bytes(path, text.encode())


def atomic_write_folder(directory: str | os.PathLike, write: typing.Callable[[Path], object]) -> Path:
    """Build a folder with ``write(tmp)`` in a temporary sibling, then rename it into place: readers never see a
    half-written folder. If another process finished the same folder first, its copy is kept; an empty folder
    there (made by hand, or left by a crash) is no copy and is replaced."""
    import shutil

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        os.chmod(tmp, umask_mode(0o777))  # mkdtemp makes it private (0700); a plain mkdir would not
        write(tmp)
        if directory.is_dir() and any(directory.iterdir()):  # another process finished first
            shutil.rmtree(tmp)
        else:
            try:
                os.replace(tmp, directory)  # (renaming onto an empty folder replaces it)
            except OSError:
                if not (directory.is_dir() and any(directory.iterdir())):
                    raise
                shutil.rmtree(tmp)  # another process filled it in between: keep its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def umask_mode(mode: int) -> int:
    """``mode`` less the process umask: the permissions ``open`` / ``mkdir`` would give a new file or folder.
    Read from ``/proc/self/status`` where there is one, so the process-wide umask is never touched."""
    try:
        with open("/proc/self/status") as fh:
            mask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o077)  # elsewhere the only portable way to read it, restored at once
        os.umask(mask)
    return mode & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # a plain open keeps an existing file's permissions and gives a new one the umask's
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = umask_mode(0o666)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # mkstemp's file is private (0600)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------- yaml files and dotted overrides
def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-4"`` -> (["train", "lr"], 1e-4); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return key.split("."), raw
    # "a: b" or "x - y" are prompts, not mappings/lists, unless written with explicit brackets
    if isinstance(value, (dict, list)) and not raw.lstrip().startswith(("{", "[")):
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
            elif not isinstance(child, dict):
                raise ValueError(f"override {item!r}: '{part}' is a value, not a section")
            node[part] = child = dict(child)
            node = child
        node[path[-1]] = value
    return data


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: list[str] | None = None) -> T:
    """Read ``path`` (yaml) if given, apply overrides, and build ``cls`` strictly (unknown keys fail)."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{p}: a config must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    return cls.from_dict(apply_overrides(data, overrides or []))


def dump_config(config: StrictConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
