import json

import pyarrow as pa
import pyarrow.csv as pc
import pyarrow.parquet as pq
import pytest

from grpo_ray.task.data import DataError, load_datasets, load_rows, to_examples
from grpo_ray.config.sections import Columns, DataSpec, DatasetSpec, EvalSpec

ROWS = [{"q": f"What is {i} + {i}?", "a": str(2 * i), "why": f"{i} + {i} = {2 * i}"} for i in range(40)]
ROWS += [{"q": "Simplify x + x.", "a": "2x", "why": "collect"}]


def _write(tmp_path, kind):
    path = tmp_path / f"set.{kind}"
    table = pa.Table.from_pylist(ROWS)
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif kind == "parquet":
        pq.write_table(table, path)
    else:
        pc.write_csv(table, path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "parquet", "csv"])
def test_local_files_with_column_mapping_and_numeric_filter(tmp_path, kind):
    ds = DatasetSpec(source=str(_write(tmp_path, kind)), columns=Columns(question="q", answer="a", reasoning="why"))
    ex = to_examples(ds, load_rows(ds))
    assert len(ex) == 40  # the symbolic answer is filtered out
    assert ex[3].question == "What is 3 + 3?" and ex[3].answer == "6" and ex[3].reasoning == "3 + 3 = 6"
    keep_all = ds.model_copy(update={"numeric_only": False})
    assert len(to_examples(keep_all, load_rows(keep_all))) == 41


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"q": "a", "a": "1"}\n{"q": "b", "a": 2\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: cannot parse as jsonl"):
        load_rows(DatasetSpec(source=str(path)))


def test_missing_column_lists_available(tmp_path):
    ds = DatasetSpec(source=str(_write(tmp_path, "jsonl")), columns=Columns(question="problem", answer="a"))
    with pytest.raises(DataError, match=r"missing column\(s\) problem; available: q, a, why"):
        to_examples(ds, load_rows(ds))


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_rows(DatasetSpec(source=str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="unknown builtin"):
        load_rows(DatasetSpec(source="builtin:nope"))


def test_heldout_eval_is_deterministic_and_disjoint():
    spec = DataSpec(
        sft=DatasetSpec(source="builtin:math_mini", columns=Columns(reasoning="reasoning")),
        grpo=DatasetSpec(source="builtin:math_mini"),
        eval=EvalSpec(size=50),
        seed=7,
    )
    a, b = load_datasets(spec), load_datasets(spec)
    assert a.eval == b.eval and a.eval_fingerprint() == b.eval_fingerprint()
    assert len(a.eval) == 50
    held = {e.question for e in a.eval}
    assert not held & {e.question for e in a.grpo}
    assert not held & {e.question for e in a.sft}
    assert all(e.reasoning for e in a.sft)
    other = load_datasets(spec.model_copy(update={"seed": 8}))
    assert other.eval_fingerprint() != a.eval_fingerprint()


def test_eval_larger_than_data_is_an_error(tmp_path):
    ds = DatasetSpec(source=str(_write(tmp_path, "jsonl")), columns=Columns(question="q", answer="a"))
    with pytest.raises(DataError, match="lower data.eval.size"):
        load_datasets(DataSpec(sft=None, grpo=ds, eval=EvalSpec(size=40)))


def test_rows_a_user_might_not_expect(tmp_path):
    """Non-numeric answers only, null cells and a 2 MB question: clear errors or clean rows."""
    import json

    words = tmp_path / "words.jsonl"
    words.write_text("".join(json.dumps({"question": f"q{i}", "answer": "forty-two"}) + "\n" for i in range(5)))
    with pytest.raises(DataError, match=r"words\.jsonl: no usable rows \(after the numeric filter: True\)"):
        to_examples(DatasetSpec(source=str(words)), load_rows(DatasetSpec(source=str(words))))
    odd = tmp_path / "odd.jsonl"
    rows = [{"question": None, "answer": "1"}, {"question": "ok?", "answer": None},
            {"question": "x" * 2_000_000, "answer": "3"}, {"question": "fine", "answer": "4"}]
    odd.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = to_examples(DatasetSpec(source=str(odd)), load_rows(DatasetSpec(source=str(odd))))
    assert [e.answer for e in ex] == ["3", "4"]  # rows with a missing cell are skipped, not crashed on
    assert len(ex[0].question) == 2_000_000  # kept here; GRPO drops prompts over grpo.max_prompt_length
