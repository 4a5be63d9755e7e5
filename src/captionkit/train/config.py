"""Typed YAML configs for training: validated, overridable, never clobbered by defaults.

Why: the seed scripts merged argparse defaults over the config file (``{**config,
**args}``), accepted misspelt keys silently and saved nothing of what actually ran.
Here a config is a (nested) dataclass; the YAML file is read first, ``--set a.b=value``
overrides are applied on top, and dataclass defaults only fill keys that neither gave.
Unknown keys and wrong types fail with the key, the file (or the ``--set``) and a fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from captionkit.train.checkpoints import atomic_write_text

T = TypeVar("T")
_log = logging.getLogger(__name__)

__all__ = ["ConfigError", "load_config", "save_config", "config_to_dict", "parse_override"]


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key, the source and the fix."""


_MISSING = object()


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into (["a", "b"], value), parsing the value as YAML.

    Why YAML: ``--set lr=1e-4``, ``--set freeze_vision=true`` and
    ``--set lora.target_modules=[q_proj,v_proj]`` then mean what they mean in the file.
    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set optimizer.lr=1e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: empty key; expected KEY=VALUE, e.g. --set optimizer.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({error})") from error
    return key.split("."), value


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"{path}: config file not found; check the path given to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error}); fix the syntax at the place shown") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Build ``cls`` from a YAML file plus ``--set`` overrides, validating every key and type.

    An override key may index a list: ``data.0.path=x`` changes the first data set, and an
    index equal to the list's length appends a new entry (``data.1.path=y`` on a one-entry
    list adds a second data set). Keys a config class renamed (its ``renamed_keys``
    mapping, old dotted key -> new one) are still read, with a logged note.

    An override can switch a mode off: ``--set SECTION=null`` drops a section (its defaults
    apply), and a section the class lists in ``sections_used_by`` (section -> (key, values
    that use it)) is left out, with a note, when an override sets that key to a value that
    does not use it (``--set mode=full`` on a file with a ``lora:`` section).
    """
    file_label = str(path) if path is not None else "<no config file>"
    data: dict[str, Any] = _read_yaml(Path(path)) if path is not None else {}
    renamed: Mapping[str, str] = getattr(cls, "renamed_keys", {}) or {}
    notes: dict[str, str] = {}
    if renamed:
        data = _rename_file_keys(data, renamed, file_label, notes)
    sources: dict[tuple[str, ...], str] = {}
    for text in overrides or []:
        keys, value = parse_override(text)
        keys = _renamed(keys, renamed, notes)
        if value is None and _drops_section(cls, data, keys):
            _log.warning("config: --set %s: the %r section is left out; its defaults apply", text, ".".join(keys))
            continue
        _apply_override(cls, data, keys, value, text)
        sources[_coerce_path(keys)] = sources[tuple(keys)] = f"--set {text!r}"
    _leave_out_unused_sections(cls, data, sources, file_label)
    for old, new in notes.items():
        _log.warning("config: %r is now spelled %r (the old spelling is still read); please update it", old, new)
    return _build_dataclass(cls, data, (), file_label, sources)


def _drops_section(cls: Any, data: dict[str, Any], keys: list[str]) -> bool:
    """``--set SECTION=null`` on a section that cannot be null: remove it from ``data`` (True)."""
    parent: Any = _annotation_at(cls, keys[:-1]) if len(keys) > 1 else cls
    if not dataclasses.is_dataclass(parent):
        return False
    declared = typing.get_type_hints(parent).get(keys[-1])
    if declared is None or not dataclasses.is_dataclass(declared):  # Optional sections take null as a value
        return False
    cursor: Any = data
    for key in keys[:-1]:
        cursor = cursor.get(key) if isinstance(cursor, dict) else None
    if isinstance(cursor, dict):
        cursor.pop(keys[-1], None)
    return True


def _leave_out_unused_sections(cls: Any, data: dict[str, Any], sources: dict[tuple[str, ...], str],
                               file_label: str) -> None:
    """Drop a file's section that an override's mode switch leaves unused (``lora:`` after ``--set mode=full``)."""
    for section, (key, users) in (getattr(cls, "sections_used_by", {}) or {}).items():
        switched = sources.get((key,))
        if switched is None or section not in data or data.get(key) in users:
            continue
        if any(path[0] == section for path in sources):  # the user also overrode the section itself: keep it
            continue
        data.pop(section)
        _log.warning("config: %s sets %s to %r, which does not use the %r section of %s; that section is left out",
                     switched, key, data.get(key), section, file_label)


def _renamed(keys: list[Any], renamed: Mapping[str, str], notes: dict[str, str]) -> list[Any]:
    """``keys`` with the longest renamed prefix replaced by its new spelling."""
    for length in range(len(keys), 0, -1):
        old = ".".join(str(key) for key in keys[:length])
        if old in renamed:
            new = renamed[old]
            notes[old] = new
            return [*new.split("."), *keys[length:]]
    return keys


def _rename_file_keys(data: dict[str, Any], renamed: Mapping[str, str], file_label: str,
                      notes: dict[str, str]) -> dict[str, Any]:
    """Move the file's old-spelling keys to their new places; one key given in both spellings fails."""
    leaves: list[tuple[list[Any], Any]] = []

    def walk(prefix: list[Any], value: Any) -> None:
        if isinstance(value, dict) and (value or not prefix):
            for key, item in value.items():
                walk([*prefix, key], item)
        else:
            leaves.append((prefix, value))

    walk([], data)
    if not any(_renamed(keys, renamed, {}) != keys for keys, _ in leaves):
        return data
    result: dict[Any, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for keys, value in leaves:
        new_keys = _renamed(keys, renamed, notes)
        spelled = ".".join(str(key) for key in keys)
        cursor: Any = result
        for depth, key in enumerate(new_keys):
            here = tuple(str(part) for part in new_keys[: depth + 1])
            if depth == len(new_keys) - 1:
                clash = key in cursor
            else:
                clash = key in cursor and not isinstance(cursor[key], dict)
                if not clash:
                    cursor = cursor.setdefault(key, {})
                    origin.setdefault(here, spelled)
                    continue
            if clash:
                first = origin.get(here, ".".join(here))
                raise ConfigError(
                    f"{file_label}: {spelled!r} and {first!r} both set {'.'.join(here)!r} "
                    f"(one is the old spelling); keep only {'.'.join(str(k) for k in new_keys)!r}"
                )
            cursor[key] = value
            origin[here] = spelled
    return result


def _index(key: str) -> int | None:
    return int(key) if key.isdigit() else None


def _apply_override(cls: Any, data: dict[str, Any], keys: list[str], value: Any, text: str) -> None:
    """Set ``value`` at ``keys`` in the raw config ``data``, walking into sections and lists."""
    cursor: Any = data
    for depth, key in enumerate(keys):
        dotted = ".".join(keys[:depth])
        last = depth == len(keys) - 1
        if isinstance(cursor, list):
            position = _index(key)
            size = len(cursor)
            if position is None or position > size:
                entries = f"{size} entr{'y' if size == 1 else 'ies'}"
                indices = f"0 to {size - 1}" if size > 1 else "0"
                raise ConfigError(
                    f"--set {text!r}: {dotted!r} is a list with {entries}; after {dotted!r} give an index: "
                    f"{indices} to change an entry, or {size} to append one" if size else
                    f"--set {text!r}: {dotted!r} is an empty list; give index 0 to add its first entry"
                )
            if position == size:
                cursor.append(value if last else _empty_container(cls, keys[: depth + 2]))
            elif last:
                cursor[position] = value
            child = cursor[position]
        elif isinstance(cursor, dict):
            if last:
                cursor[key] = value
                return
            child = cursor.get(key)
            if child is None:
                child = cursor[key] = _empty_container(cls, keys[: depth + 2])
        else:
            raise ConfigError(
                f"--set {text!r}: {dotted!r} is a value, not a section or a list, "
                f"so {'.'.join(keys)!r} cannot be set"
            )
        if last:
            return
        if not isinstance(child, (dict, list)):
            raise ConfigError(
                f"--set {text!r}: {'.'.join(keys[: depth + 1])!r} is a value, not a section or a list, "
                f"so {'.'.join(keys)!r} cannot be set"
            )
        cursor = child


def _empty_container(cls: Any, keys: list[str]) -> dict | list:
    """A new list where the config class declares a list at ``keys[:-1]``, else a new section.

    ``keys`` ends with the key that will be set inside the new container: a number there
    on a list-typed field (``data.0.path`` with no ``data`` yet) starts a list.
    """
    annotation = _annotation_at(cls, keys[:-1])
    if get_origin(annotation) in (list, tuple) and _index(keys[-1]) is not None:
        return []
    return {}


def _annotation_at(cls: Any, keys: list[str]) -> Any:
    """The declared type at a dotted path of ``cls`` (None when it is not known)."""
    annotation: Any = cls
    for key in keys:
        annotation = _without_none(annotation)
        if dataclasses.is_dataclass(annotation):
            annotation = typing.get_type_hints(annotation).get(key)
        elif get_origin(annotation) in (list, tuple):
            args = [arg for arg in get_args(annotation) if arg is not Ellipsis]
            annotation = args[0] if len(args) == 1 else None
        elif get_origin(annotation) in (dict, Mapping):
            args = get_args(annotation)
            annotation = args[1] if args else None
        else:
            return None
        if annotation is None:
            return None
    return _without_none(annotation)


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        args = [arg for arg in get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def _coerce_path(keys: list[str]) -> tuple[str, ...]:
    """Override keys in the form error messages use: ``data.0.path`` -> ("data[0]", "path")."""
    path: list[str] = []
    for key in keys:
        if path and key.isdigit():
            path[-1] = f"{path[-1]}[{key}]"
        else:
            path.append(key)
    return tuple(path)


def _source_of(path: tuple[str, ...], file_label: str, sources: dict[tuple[str, ...], str]) -> str:
    for length in range(len(path), 0, -1):
        if path[:length] in sources:
            return sources[path[:length]]
    return file_label


def _type_name(annotation: Any) -> str:
    origin = get_origin(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in get_args(annotation))
    if origin in (list, tuple, set, frozenset):
        args = [arg for arg in get_args(annotation) if arg is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        args = get_args(annotation)
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}" if args else "a mapping"
    if dataclasses.is_dataclass(annotation):
        return f"a section ({annotation.__name__})"
    if annotation is Path:
        return "a path"
    if isinstance(annotation, type):
        return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}.get(
            annotation.__name__, annotation.__name__
        )
    return str(annotation)


def _build_dataclass(
    cls: Any, data: Any, path: tuple[str, ...], file_label: str, sources: dict[tuple[str, ...], str]
) -> Any:
    where = ".".join(path)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{_source_of(path, file_label, sources)}: {where or 'the config'!s} must be a mapping "
            f"(a section of keys), got {data!r}"
        )
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    for key in data:
        if key not in fields:
            dotted = ".".join((*path, str(key)))
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f" Did you mean {'.'.join((*path, close[0]))!r}?" if close else ""
            raise ConfigError(
                f"{_source_of((*path, str(key)), file_label, sources)}: unknown key {dotted!r}.{hint} "
                f"Valid keys{' in ' + where if where else ''}: {', '.join(sorted(fields))}"
            )
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], (*path, name), file_label, sources)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            dotted = ".".join((*path, name))
            raise ConfigError(
                f"{file_label}: required key {dotted!r} is missing; "
                f"add it to the file or pass --set {dotted}=..."
            )
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"{_source_of(path, file_label, sources)}: {where or 'config'}: {error}") from error


def _coerce(value: Any, annotation: Any, path: tuple[str, ...], file_label: str, sources: dict) -> Any:
    dotted = ".".join(path)

    def fail(extra: str = "") -> ConfigError:
        return ConfigError(
            f"{_source_of(path, file_label, sources)}: {dotted!r} must be {_type_name(annotation)}, "
            f"got {value!r}{extra}"
        )

    if annotation is Any:
        return value
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = get_args(annotation)
        if value is None:
            if type(None) in args:
                return None
            raise fail()
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path, file_label, sources)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        raise fail()
    if origin is Literal:
        choices = get_args(annotation)
        bool_mismatch = isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)
        if value in choices and not bool_mismatch:
            return value
        if bool_mismatch:
            # YAML 1.1 reads a bare no/yes/off/on as false/true: `--set mixed_precision=no` means "no".
            for word in (("no", "off", "false") if value is False else ("yes", "on", "true")):
                if word in choices:
                    return word
        close = difflib.get_close_matches(str(value), [str(choice) for choice in choices], n=1, cutoff=0.5)
        raise fail(f" (did you mean {close[0]!r}?)" if close else "")
    if dataclasses.is_dataclass(annotation):
        return _build_dataclass(annotation, value, path, file_label, sources)
    if origin in (list, tuple, set, frozenset):
        if not isinstance(value, (list, tuple)):
            raise fail()
        args = [arg for arg in get_args(annotation) if arg is not Ellipsis]
        if origin is tuple and len(args) > 1 and Ellipsis not in get_args(annotation):
            if len(value) != len(args):
                raise fail(f" (expected {len(args)} items)")
            return tuple(
                _coerce(item, arg, (*path[:-1], f"{path[-1]}[{i}]"), file_label, sources)
                for i, (item, arg) in enumerate(zip(value, args, strict=True))
            )
        item_type = args[0] if args else Any
        items = [
            _coerce(item, item_type, (*path[:-1], f"{path[-1]}[{i}]"), file_label, sources)
            for i, item in enumerate(value)
        ]
        return origin(items) if origin is not list else items
    if origin in (dict, Mapping):
        if not isinstance(value, dict):
            raise fail()
        key_type, value_type = get_args(annotation) or (Any, Any)
        return {
            _coerce(key, key_type, (*path, str(key)), file_label, sources): _coerce(
                item, value_type, (*path, str(key)), file_label, sources
            )
            for key, item in value.items()
        }
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise fail(" (write true or false)")
    if annotation is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise fail()
    if annotation is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads ``1e-4`` (no dot) as a string; accept what users mean.
            try:
                return float(value)
            except ValueError:
                pass
        raise fail()
    if annotation is str:
        if isinstance(value, str):
            return value
        raise fail(" (quote it in YAML if it is meant as text)")
    if annotation is Path:
        if isinstance(value, str) and "://" in value and not value.lower().startswith("file://"):
            # Path("s3://b/k") would be the local "s3:/b/k"; fields that take URLs are typed `Path | str`
            raise fail(" (an object-store URL is not read here; give a local path)")
        if isinstance(value, (str, Path)) and str(value):
            return Path(str(value)[len("file://"):] if str(value).lower().startswith("file://") else value)
        raise fail()
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        try:
            return annotation(value)
        except ValueError:
            raise fail() from None
    if isinstance(annotation, type):
        if isinstance(value, annotation):
            return value
        raise fail()
    return value


#: a config field's metadata key: the field is never written out (``storage_options``: credentials)
NOT_SAVED = "not_saved"


def config_to_dict(obj: Any) -> Any:
    """A plain YAML/JSON-safe structure of a config dataclass (Paths become strings).

    Fields marked ``metadata={NOT_SAVED: True}`` are left out: the saved config, the run log and
    experiment trackers never see them.
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {field.name: config_to_dict(getattr(obj, field.name)) for field in dataclasses.fields(obj)
                if not field.metadata.get(NOT_SAVED)}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {str(key): config_to_dict(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [config_to_dict(item) for item in obj]
    return obj


def save_config(obj: Any, path: str | Path) -> None:
    """Write the effective config as YAML, atomically; it loads back with :func:`load_config`."""
    text = yaml.safe_dump(config_to_dict(obj), sort_keys=False, allow_unicode=True, default_flow_style=False)
    atomic_write_text(path, text)
