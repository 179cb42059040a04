"""A spec's user errors: :class:`SpecError` names the file, the line and the field, so the CLI prints
one line; pydantic's validation errors are turned into one here.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class SpecError(ValueError):
    """A user error in a spec: carries the file, line and field so the CLI can print one line."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, field: str | None = None):
        self.message, self.file, self.line, self.field = message, file, line, field
        where = file or "<spec>"
        if line is not None:
            where += f":{line}"
        prefix = f"{where}: " + (f"{field}: " if field else "")
        super().__init__(prefix + message)


class FieldError(ValueError):
    """A cross-field check's error that belongs to one dotted field (so the error names its line)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def line_of(doc: Any, loc: tuple[Any, ...], lines: dict[int, dict[str, int]]) -> int | None:
    """Walk ``loc`` into the parsed document; the line of the deepest key that exists."""
    line, node = None, doc
    for key in loc:
        if isinstance(node, dict) and key in node:
            line = lines.get(id(node), {}).get(key, line)
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            break
    return line


def from_validation(e: ValidationError, file: str | None, doc: Any, lines: dict | None = None) -> SpecError:
    err = e.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p[:1].isupper()))  # drop union tags
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):  # a cross-field check names the field it is about
        loc = tuple(cause.field.split("."))
    field = ".".join(str(p) for p in loc) or None
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling; see `grpo-ray validate --help` for the fields)"
    elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    more = len(e.errors()) - 1
    if more > 0:
        msg += f" (and {more} more error{'s' if more > 1 else ''})"
    line = line_of(doc, loc, lines or {}) if doc is not None else None
    return SpecError(msg, file=file, line=line, field=field)


