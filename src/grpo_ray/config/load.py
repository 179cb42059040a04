"""Loading a spec: YAML text or a file into a validated :class:`~grpo_ray.config.spec.SweepSpec`,
with YAML syntax and validation errors as a :class:`~grpo_ray.config.errors.SpecError` that names
the file, the line and the field; and the resolved spec written back as YAML.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from grpo_ray.config.errors import SpecError, from_validation, line_of
from grpo_ray.config.overrides import check_space
from grpo_ray.config.spec import SweepSpec


# --------------------------------------------------------------------------- loading
class _LineLoader(yaml.SafeLoader):
    """A YAML loader that remembers the line of every mapping key, for error messages."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    mapping_lines.setdefault(id(loader), {})[id(mapping)] = lines
    return mapping


mapping_lines: dict[int, dict[int, dict[str, int]]] = {}
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class SpecLines:
    """The line of each field of a parsed spec file, for errors found after parsing (``validate``'s
    checks of data, rewards and model)."""

    def __init__(self, file: str, doc: Any, lines: dict[int, dict[str, int]]) -> None:
        self.file, self._doc, self._lines = file, doc, lines

    def line(self, field: str) -> int | None:
        """The line of a dotted field (``data.sft.source``, ``rewards.1.name``), or of its deepest parent."""
        loc = tuple(int(p) if p.isdigit() else p for p in field.split("."))
        return line_of(self._doc, loc, self._lines)

    def error(self, field: str, message: str) -> SpecError:
        return SpecError(message, file=self.file, line=self.line(field), field=field)


def parse_spec(text: str, file: str = "<spec>") -> SweepSpec:
    """Parse and validate spec YAML text; raise :class:`SpecError` on any user error."""
    return parse_spec_lines(text, file)[0]


def parse_spec_lines(text: str, file: str = "<spec>") -> tuple[SweepSpec, SpecLines]:
    """:func:`parse_spec`, and where each field stands in ``text``."""
    try:
        loader = _LineLoader(text)  # the reader refuses control characters here, before parsing
    except yaml.reader.ReaderError as e:
        line = text[: e.position].count("\n") + 1
        raise SpecError(f"invalid YAML: {e.reason} (#x{ord(e.character) if isinstance(e.character, str) else e.character:04x})", file=file, line=line) from None
    try:
        doc = loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        raise SpecError(f"invalid YAML: {e.problem or e}", file=file, line=line) from None
    except yaml.YAMLError as e:  # e.g. a control character met while reading
        raise SpecError(f"invalid YAML: {' '.join(str(e).split())}", file=file) from None
    finally:
        lines = mapping_lines.pop(id(loader), {})
        loader.dispose()
    if not isinstance(doc, dict):
        raise SpecError("expected a mapping of spec fields at the top level", file=file, line=1)
    try:
        spec = SweepSpec.model_validate(doc)
    except ValidationError as e:
        raise from_validation(e, file, doc, lines) from None
    try:
        check_space(spec)
    except SpecError as e:
        path = e.field.split(".", 2)[2]
        line = lines.get(id(doc["search"]["space"]), {}).get(path)
        raise SpecError(e.message, file=file, line=line, field=e.field) from None
    return spec, SpecLines(file, doc, lines)


MAX_SPEC_BYTES = 1_000_000  # a spec is a page of YAML; a bigger file is a mistake (and YAML parsing is slow)


def read_spec_text(path: str | Path) -> str:
    """A spec file's text, or a :class:`SpecError` in one line: missing, a directory, too big, not UTF-8."""
    p = Path(path)
    try:
        if p.is_dir():
            raise SpecError("is a directory, expected a spec file (YAML)", file=str(path))
        size = p.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{size:,} bytes, over the limit of {MAX_SPEC_BYTES:,} bytes (1 MB) for a spec; "
                            "keep long texts (a system prompt) short or out of the spec", file=str(path))
        data = p.read_bytes()
    except OSError as e:
        raise SpecError(f"cannot read spec file: {e.strerror or e}", file=str(path)) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SpecError(f"not UTF-8 text (byte {e.start}: 0x{data[e.start]:02x}); a spec is a YAML file",
                        file=str(path), line=line) from None


def load_spec(path: str | Path) -> SweepSpec:
    """Read a spec file. Relative local data/model paths stay relative to the current directory."""
    return parse_spec(read_spec_text(path), file=str(path))


def load_spec_lines(path: str | Path) -> tuple[SweepSpec, SpecLines]:
    """:func:`load_spec`, and where each field stands in the file (for later checks' errors)."""
    return parse_spec_lines(read_spec_text(path), file=str(path))


def dump_spec(spec: SweepSpec) -> str:
    """The resolved spec (defaults filled in) as YAML."""
    return yaml.safe_dump(spec.model_dump(mode="json", by_alias=True), sort_keys=False, width=100)
