"""Write docs/spec.md, the spec reference, from the pydantic models in src/grpo_ray/config/.

    python scripts/gen_spec_docs.py          # (re)write docs/spec.md
    python scripts/gen_spec_docs.py --check  # exit 1 when docs/spec.md is stale

The page walks SweepSpec's model tree (``model_fields``, nested models, list / Optional /
Union / dict types): the top-level fields, then one section per spec section with a table
of dotted field | type | default | description. Defaults are the ones that apply at each
path (``data.sft.split`` is ``"cot"``, not DatasetSpec's ``"train"``). The output depends on
the models alone, so it is deterministic; tests/test_spec_docs.py fails when it is stale.
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # this checkout's spec, not an installed one

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from grpo_ray.config.spec import SweepSpec

OUTPUT = REPO / "docs" / "spec.md"
COMMAND = "python scripts/gen_spec_docs.py"
MAX_STR = 40  # longer string defaults (the system prompt) are cut with "…"

INTRO = f"""\
# Spec reference

<!-- Generated from src/grpo_ray/config/ by scripts/gen_spec_docs.py: do not edit by hand;
     run `{COMMAND}` after changing the spec models. -->

A sweep spec is one YAML file. Only `name` is required: every other field has a default, and
the defaults follow Unsloth's GRPO tutorial (Qwen3 base, SFT format warm-up, GRPO with the
four rule-based rewards). Unknown keys are errors; `grpo-ray validate SPEC` checks a spec in
well under a second and names the file, line and field of any mistake.

Each table lists a section's fields by their dotted path, the path that `search.space` uses
to search a field (`lora.rank`, `grpo.temperature`, `rewards.<name>.weight`). `[]` marks the
items of a list. The default column shows the value that applies at that path when the spec
leaves it out; under a field whose default is `null` (`data.eval.source`,
`search.early_stopping`) it shows what applies once that field is set. In the type column,
`X | null` also accepts YAML `null`, and quoted values (`"max" | "min"`) are the only values
a field accepts.
"""


# --------------------------------------------------------------------------- types
def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _non_null(tp: Any) -> list[Any]:
    return [a for a in get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]


def type_str(tp: Any) -> str:
    """A readable type: ``int | null``, ``"max" | "min"``, ``list[str]``, ``[float, float]``."""
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return " | ".join(value_str(a) for a in args)
    if _is_union(tp):
        return " | ".join(type_str(a) for a in args)
    if origin is list:
        return f"list[{type_str(args[0])}]"
    if origin is tuple:
        return "[" + ", ".join(type_str(a) for a in args) + "]"
    if origin is dict:
        return f"dict[{type_str(args[0])}, {type_str(args[1])}]"
    return tp.__name__


def constraints(fi: FieldInfo) -> list[str]:
    """The field's bounds and patterns as short text: ``> 0``, ``<= 1``, ``at least 1 item``."""
    out = []
    for m in fi.metadata:
        for attr, text in (("gt", "> {}"), ("ge", ">= {}"), ("lt", "< {}"), ("le", "<= {}"),
                           ("min_length", "at least {} item"), ("max_length", "at most {} item"),
                           ("pattern", "matches {}")):
            v = getattr(m, attr, None)
            if v is not None:
                text = text + "s" if attr.endswith("length") and v != 1 else text
                out.append(text.format(f"`{v}`" if attr == "pattern" else value_str(v)))
    return out


# --------------------------------------------------------------------------- values
def _float_str(v: float) -> str:
    r = repr(v)
    if "e" in r:  # YAML 1.1 (PyYAML) reads 5e-06 as a string: write 5.0e-6
        mantissa, exp = r.split("e")
        if "." not in mantissa:
            mantissa += ".0"
        r = f"{mantissa}e{int(exp)}"
    return r


def value_str(v: Any) -> str:
    """A default as YAML-ish text: null, true, 0.7, "q8_0", [..], {name: ..}; long strings cut with "…"."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return _float_str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        text = json.dumps(v, ensure_ascii=False)
        return text if len(v) <= MAX_STR else json.dumps(v[:MAX_STR], ensure_ascii=False)[:-1] + '…"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value_str(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {value_str(x)}" for k, x in v.items()) + "}"
    if isinstance(v, BaseModel):  # the fields that differ from the model's own defaults
        fields = type(v).model_fields
        items = [(fi.alias or k, getattr(v, k)) for k, fi in fields.items()
                 if fi.is_required() or getattr(v, k) != fi.get_default(call_default_factory=True)]
        return "{" + ", ".join(f"{k}: {value_str(x)}" for k, x in items) + "}"
    return repr(v)


def default_of(fi: FieldInfo) -> Any:
    """The field's own default, PydanticUndefined when it is required."""
    if fi.is_required():
        return PydanticUndefined
    return fi.get_default(call_default_factory=True)


def default_str(value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{value_str(value)}`"


# --------------------------------------------------------------------------- walking the models
_PLACEHOLDER = re.compile(r"[\w./:-]*<[\w/.-]+>[\w./<>-]*")


def _code(m: re.Match[str]) -> str:
    word = m.group(0)
    tail = len(word) - len(word.rstrip(".:"))
    return f"`{word[:len(word) - tail]}`{word[len(word) - tail:]}"


def _md(text: str) -> str:
    """Markdown-safe prose: ``x`` -> `x`; outside code spans, words with <placeholders> or <tags>
    (`<storage>/<name>`, `<think>`) become code, so they show instead of being read as HTML."""
    parts = text.replace("``", "`").split("`")
    out = []
    for i, part in enumerate(parts):
        if not i % 2:
            pieces = _PLACEHOLDER.sub(_code, part).split("`")
            part = "`".join(q if j % 2 else re.sub(r"<(?=[A-Za-z/!?])", "&lt;", q) for j, q in enumerate(pieces))
        out.append(part)
    return "`".join(out)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _doc(cls: type[BaseModel]) -> str | None:
    doc = cls.__dict__.get("__doc__")
    return _md(inspect.cleandoc(doc)) if doc else None


class _Page:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def para(self, *texts: str | None) -> None:
        for t in texts:
            if t:
                self.lines += [t, ""]

    def table(self, rows: list[tuple[str, str, str, str]]) -> None:
        self.lines += ["| field | type | default | description |", "|---|---|---|---|"]
        self.lines += [f"| `{_cell(p)}` | {_cell(t)} | {_cell(d)} | {_cell(_md(desc))} |" for p, t, d, desc in rows]
        self.lines.append("")


def _models_in(tp: Any) -> tuple[str, list[type[BaseModel]]]:
    """How a field holds models: ('model', [cls]), ('list', [cls]), ('dict', [members]), or ('', [])."""
    for t in _non_null(tp):
        if _is_model(t):
            return "model", [t]
        if get_origin(t) is list and _is_model(get_args(t)[0]):
            return "list", [get_args(t)[0]]
        if get_origin(t) is dict:
            members = [m for m in _non_null(get_args(t)[1]) if _is_model(m)]
            if members:
                return "dict", members
    return "", []


def _row(path: str, fi: FieldInfo, value: Any, default: str | None = None) -> tuple[str, str, str, str]:
    tp = ", ".join([type_str(fi.annotation)] + constraints(fi))
    return path, tp, default or default_str(value), fi.description or ""


def _rows(page: _Page, prefix: str, cls: type[BaseModel], obj: Any, rows: list, later: list, depth: int) -> None:
    """Rows for ``cls``'s fields under ``prefix``; nested models flattened, or deferred to a subsection
    when they are direct children of a section (depth 1)."""
    for name, fi in cls.model_fields.items():
        path = f"{prefix}.{fi.alias or name}"
        value = getattr(obj, name) if isinstance(obj, BaseModel) else default_of(fi)
        rows.append(_row(path, fi, value))
        kind, models = _models_in(fi.annotation)
        if not kind:
            continue
        if kind == "dict":
            later.append(("dict", path, fi, models, None))
        elif depth == 1:
            later.append((kind, path, fi, models, value))
        else:
            sub = value if isinstance(value, BaseModel) else None
            _rows(page, f"{path}[]" if kind == "list" else path, models[0], sub, rows, later, depth + 1)


def _block(page: _Page, level: int, kind: str, path: str, fi: FieldInfo, models: list, value: Any) -> None:
    page.lines += [f"{'#' * level} `{path}`", ""]
    if kind != "model" or not _doc(models[0]):  # a model's docstring says it (and the field is in a table)
        page.para(_md(fi.description or ""))
    if kind == "dict":
        page.para("Each entry maps a dotted spec path (the `field` column of these tables) to one domain; "
                  "every value a domain can produce is validated at its path when the spec loads:")
        page.lines += [f"- {_doc(m)}" for m in models if _doc(m)] + [""]
        rows: list = []
        for m in models:
            for name, sub in m.model_fields.items():
                rows.append(_row(f"{path}.<path>.{sub.alias or name}", sub, default_of(sub)))
        page.table(rows)
        return
    cls = models[0]
    if kind == "list":
        page.para(f"A list of {cls.__name__}; default: `{value_str(value)}`.")
    page.para(_doc(cls))
    rows, later = [], []
    item = value if isinstance(value, BaseModel) else None
    _rows(page, f"{path}[]" if kind == "list" else path, cls, item, rows, later, 1 if level == 2 else 2)
    page.table(rows)
    for sub in later:
        _block(page, level + 1, *sub)


def render() -> str:
    """The whole of docs/spec.md, from SweepSpec's models."""
    page = _Page()
    page.lines += INTRO.splitlines() + [""]
    top = [(n, fi) for n, fi in SweepSpec.model_fields.items() if not _models_in(fi.annotation)[0]]
    sections = [(n, fi) for n, fi in SweepSpec.model_fields.items() if _models_in(fi.annotation)[0]]
    page.lines += ["## Top-level fields", ""]
    page.para(_doc(SweepSpec))
    page.table([_row(n, fi, default_of(fi), None if (n, fi) in top else f"see [`{n}`](#{n})")
                for n, fi in SweepSpec.model_fields.items()])
    for name, fi in sections:
        kind, models = _models_in(fi.annotation)
        _block(page, 2, kind, name, fi, models, default_of(fi))
    while page.lines and not page.lines[-1]:
        page.lines.pop()
    return "\n".join(page.lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if docs/spec.md differs from the models")
    args = ap.parse_args(argv)
    text = render()
    shown = OUTPUT.relative_to(REPO) if OUTPUT.is_relative_to(REPO) else OUTPUT
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else None
        if current != text:
            state = "missing" if current is None else "stale (it differs from src/grpo_ray/config/)"
            print(f"{shown} is {state}: run `{COMMAND}`", file=sys.stderr)
            return 1
        print(f"{shown} is up to date")
        return 0
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
