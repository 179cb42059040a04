"""Every spec field is documented where it is declared, and docs/spec.md is generated from it."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from typing import Any, get_args, get_origin

import pytest
from conftest import REPO
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from grpo_ray.config.search import Objective
from grpo_ray.config.spec import SweepSpec
from grpo_ray.config.training import LoraSpec

REGENERATE = "python scripts/gen_spec_docs.py"


def _generator() -> Any:
    name = "gen_spec_docs"
    if name not in sys.modules:
        loader = importlib.util.spec_from_file_location(name, REPO / "scripts" / "gen_spec_docs.py")
        module = importlib.util.module_from_spec(loader)
        sys.modules[name] = module
        loader.loader.exec_module(module)
    return sys.modules[name]


def _models(tp: Any) -> Iterator[tuple[str, type[BaseModel]]]:
    """The models a field's type holds, with the path suffix that reaches them ('', '[]', '.<path>')."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        yield "", tp
        return
    origin, args = get_origin(tp), get_args(tp)
    if origin is list:
        for suffix, m in _models(args[0]):
            yield "[]" + suffix, m
    elif origin is dict:
        for suffix, m in _models(args[1]):
            yield ".<path>" + suffix, m
    elif args:  # Optional / Union / Literal / tuple
        for a in args:
            yield from _models(a)


def reachable_fields(cls: type[BaseModel] = SweepSpec, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every field of every model reachable from ``cls``, by dotted path (``search.objectives[].metric``)."""
    for name, fi in cls.model_fields.items():
        path = f"{prefix}{fi.alias or name}"
        yield path, fi
        for suffix, model in _models(fi.annotation):
            yield from reachable_fields(model, f"{path}{suffix}.")


def reachable_models(cls: type[BaseModel] = SweepSpec) -> set[type[BaseModel]]:
    out = {cls}
    for fi in cls.model_fields.values():
        for _, model in _models(fi.annotation):
            out |= reachable_models(model)
    return out


def undocumented() -> list[str]:
    return [path for path, fi in reachable_fields() if not (fi.description or "").strip()]


def test_every_field_has_a_description():
    missing = undocumented()
    assert not missing, ("spec fields without a description (give each a Field(..., description=...) in "
                         f"src/grpo_ray/config/): {', '.join(missing)}")


def test_the_description_check_names_an_offender(monkeypatch):
    # The check above can fail: a field without a description is named by its dotted path.
    monkeypatch.setattr(LoraSpec.model_fields["rank"], "description", None)
    monkeypatch.setattr(Objective.model_fields["mode"], "description", "  ")
    assert undocumented() == ["lora.rank", "search.objectives[].mode"]


def test_the_walk_reaches_every_spec_model():
    names = {m.__name__ for m in reachable_models()}
    assert {"ModelSpec", "FormatSpec", "Columns", "DatasetSpec", "EvalSpec", "DataSpec", "RewardSpec", "LoraSpec",
            "SftSpec", "GrpoSpec", "Choice", "Uniform", "LogUniform", "IntRange", "Objective", "EarlyStopping",
            "SearchSpec", "ResourcesSpec", "ExportSpec", "TrialSpec", "TrackingSpec", "SweepSpec"} <= names
    paths = dict(reachable_fields())
    assert {"data.eval.source.columns.kind", "search.space.<path>.int", "rewards[].weight",
            "search.early_stopping.max_t"} <= set(paths)


def test_every_spec_model_has_a_docstring():
    missing = sorted(m.__name__ for m in reachable_models() if not (m.__dict__.get("__doc__") or "").strip())
    assert not missing, f"spec models without a docstring of their own: {', '.join(missing)}"


def test_docs_spec_md_is_current():
    expected = _generator().render()
    current = (REPO / "docs" / "spec.md").read_text(encoding="utf-8")
    if current != expected:
        old, new = current.splitlines(), expected.splitlines()
        line = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
        pytest.fail(f"docs/spec.md is stale (first difference at line {line + 1}): run `{REGENERATE}` and commit "
                    "docs/spec.md", pytrace=False)


def test_render_shows_every_field_and_the_defaults_at_their_path():
    text = _generator().render()
    assert text == _generator().render()  # deterministic
    for path, _ in reachable_fields():
        assert f"| `{path}` |" in text, path
    assert '| `data.sft.split` | str | `"cot"` |' in text  # the default at the path, not DatasetSpec's "train"
    assert '| `data.eval.source.split` | str | `"train"` |' in text
    assert "| `grpo.learning_rate` | float, > 0 | `5.0e-6` |" in text  # a float YAML reads back as a float
    assert '`"You are given a problem.\\nThink about the…"`' in text  # long defaults are shortened
    assert "| `name` | str, matches `^[A-Za-z0-9][A-Za-z0-9_.-]*$` | required |" in text
    for section in ("model", "format", "data", "data.sft", "data.grpo", "data.eval", "rewards", "lora", "sft",
                    "grpo", "search", "search.space", "search.early_stopping", "resources", "trial", "tracking",
                    "export"):
        assert f"# `{section}`\n" in text, section
    assert "{loguniform: [1.0e-6, 2.0e-5]}" in text and "Top-level fields" in text


def test_check_mode_fails_on_a_stale_page_and_names_the_command(tmp_path, monkeypatch, capsys):
    gen = _generator()
    page = tmp_path / "spec.md"
    monkeypatch.setattr(gen, "OUTPUT", page)
    assert gen.main(["--check"]) == 1  # missing
    assert REGENERATE in capsys.readouterr().err
    assert gen.main([]) == 0 and page.read_text(encoding="utf-8") == gen.render()
    assert gen.main(["--check"]) == 0
    page.write_text(page.read_text(encoding="utf-8").replace("GRPO", "PPO", 1), encoding="utf-8")
    assert gen.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "stale" in err and REGENERATE in err
