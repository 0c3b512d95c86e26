"""Recipe files: a YAML mapping read (and written) with every fault in one line naming the file, line and fix.

PyYAML's safe loader, plus what it lacks for hand-written files: a key given twice is refused (PyYAML silently
keeps the last), a non-UTF-8 byte is named with its offset and line, and each YAML error gets its fix.
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Hashable, Mapping
from pathlib import Path, PurePath
from typing import Any

import yaml

from dpo_xpu.errors import RecipeError
from dpo_xpu.files import atomic_write_bytes


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping."""


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader (plain values only, no tags such as ``!!python/object``) that also refuses a key
    given twice in one mapping, at any depth."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` merges may be overridden on purpose
            key = self.construct_object(key_node, deep=True)  # an unhashable key: PyYAML's own error follows
            if isinstance(key, Hashable) and (first := first_seen.setdefault(key, key_node)) is not key_node:
                raise _DuplicateKeyError(
                    None,
                    None,
                    f"key {key!r} is given twice, on lines {first.start_mark.line + 1} and "
                    f"{key_node.start_mark.line + 1}",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[str, str, str]:
    """A PyYAML error as one line's parts: where (``", line 2, column 1"``, or ``""``), what, and the fix."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    if isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow, found before parsing
        problem = str(exc).splitlines()[0]
        where = f", line {text.count(chr(10), 0, exc.position) + 1}"
    problem = " ".join(str(problem or type(exc).__name__).split()).replace("tag:yaml.org,2002:", "!!")
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context not in problem and context_mark and mark and context_mark.line != mark.line:
        problem += f" ({context} that starts on line {context_mark.line + 1})"
    if isinstance(exc, _DuplicateKeyError):
        fix = "keep one of them (YAML would silently keep the last)"
    elif "'\\t'" in problem:
        fix = "indent with spaces: YAML does not allow tabs"
    elif "constructor for the tag" in problem:
        fix = "remove the tag: a recipe holds plain values (numbers, strings, true/false, lists, mappings)"
    elif isinstance(exc, yaml.reader.ReaderError):
        fix = "remove that character"
    else:
        fix = (
            "check the indentation of that line and the one before (top-level keys start in column 1, nested ones "
            "are indented with spaces), and quote values that hold ': ', ' #' or brackets"
        )
    return where, problem, fix


def recipe_mapping(values: Any, what: str = "make_recipe") -> dict[str, Any]:
    """``values`` (a mapping of recipe keys, given to ``what``) as a dict.

    Raises:
        RecipeError: ``values`` is not a mapping (a string: a file's path or text, for load_recipe), or a key is not
            a name.
    """
    if not isinstance(values, Mapping):
        hint = "; load_recipe(path) reads a recipe file" if isinstance(values, (str, PurePath)) else ""
        raise RecipeError(
            f"{what}: expected a mapping of recipe keys ({{'max_steps': 3}}), found {type(values).__name__} "
            f"{reprlib.repr(values)}{hint}"
        )
    names = [key for key in values if not isinstance(key, str)]
    if names:
        raise RecipeError(f"recipe key {names[0]!r} is not a name: keys are names such as learning_rate (key: value)")
    return dict(values)


def parse_overrides(overrides: list[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """Parse ``["key=value", ...]`` (the CLI's ``--set``) into a dict; values are read as YAML scalars. A mapping
    is taken as it is (:func:`recipe_mapping`).

    Raises:
        RecipeError: ``overrides`` is neither a list of ``key=value`` strings nor a mapping, an item without ``=``,
            or a value that is not valid YAML (``beta=[``).
    """
    if isinstance(overrides, Mapping):
        return recipe_mapping(overrides, "overrides")
    if not isinstance(overrides, (list, tuple, type(None))) or not all(isinstance(i, str) for i in overrides or []):
        raise RecipeError(
            f'overrides: expected a list of "key=value" strings (as --set takes) or a mapping of recipe keys, found '
            f"{reprlib.repr(overrides)}"
        )
    result: dict[str, Any] = {}
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set expects key=value, found {item!r}")
        try:
            result[key.strip()] = yaml.load(raw, Loader=_RecipeLoader) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(
                f"--set {item}: the value is not valid YAML ({_yaml_problem(exc, raw)[1]}); quote it"
            ) from None
    return result


def with_overrides(values: dict[str, Any], overrides: list[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``values`` (a recipe file's) with ``overrides`` (:func:`parse_overrides`) applied over them: an override also
    replaces the key where the file gives it inside ``trl_options``.

    Raises:
        RecipeError: as :func:`parse_overrides`.
    """
    given, nested = parse_overrides(overrides), values.get("trl_options")
    if isinstance(nested, Mapping) and nested.keys() & given.keys():
        values = {**values, "trl_options": {key: v for key, v in nested.items() if key not in given}}
    return {**values, **given}


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The mapping a recipe file (YAML, UTF-8) holds, its values as YAML reads them; ``{}`` for an empty file.

    Raises:
        RecipeError: ``path`` is not a path, the file is missing, a folder or unreadable, is not UTF-8 (the byte, its
            offset and line), is not valid YAML (the line, the problem and the fix), repeats a key, or is not a YAML
            mapping.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise RecipeError(f"recipe file: expected a path (a str or Path), found {type(path).__name__} {path!r}")
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"{path} is a folder, not a recipe file: give a .yaml file")
    if not path.exists():
        raise RecipeError(f"recipe file {path} does not exist")
    if not path.is_file():  # a FIFO, a device
        raise RecipeError(f"recipe file {path} cannot be read (not a regular file): give a readable .yaml file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(
            f"recipe file {path} cannot be read ({exc.strerror or exc}): give a readable .yaml file"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(
            f"recipe file {path} is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line}) "
            "is not valid UTF-8 (a Latin-1 or Windows-1252 file?); save it as UTF-8 (iconv -f latin1 -t utf-8, "
            "or your editor's encoding setting)"
        ) from None
    try:
        loaded = yaml.load(text, Loader=_RecipeLoader)
    except yaml.YAMLError as exc:
        where, problem, fix = _yaml_problem(exc, text)
        raise RecipeError(f"recipe file {path}{where}: {problem}; {fix}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise RecipeError(
            f"recipe file {path} must be a mapping of recipe keys (key: value), found {type(loaded).__name__}"
        )
    return loaded or {}


def write_recipe_file(path: str | Path, values: dict[str, Any]) -> Path:
    """Write ``values`` (plain values, in their order) as a YAML recipe file at ``path``, and return the path."""
    path = Path(path)
    atomic_write_bytes(path, yaml.safe_dump(values, sort_keys=False, allow_unicode=True).encode("utf-8"))
    return path
