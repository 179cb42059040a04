"""Data: hub and local loaders, column mapping, the numeric filter and the held-out split.

Every set becomes a list of :class:`Example` (question, answer, optional reasoning). The eval
set is held out deterministically (by ``data.seed``) and is disjoint from both training sets
by question text, so every trial of a sweep is scored on the same unseen problems.
Local files are read with pyarrow; hub names go through ``datasets.load_dataset``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpo_ray.config.sections import DatasetSpec, DataSpec
from grpo_ray.task.rewards import parse_number

BUILTIN = {"builtin:math_mini": Path(__file__).resolve().parents[1] / "assets" / "math_mini.jsonl"}  # grpo_ray/assets
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """A user error in a data set: names the source, the line or column, and what is expected."""


@dataclass(frozen=True)
class Example:
    question: str
    answer: str
    reasoning: str | None = None
    kind: str | None = None  # the problem's kind (data.*.columns.kind): held-out accuracy per kind


@dataclass(frozen=True)
class Datasets:
    sft: list[Example]
    grpo: list[Example]
    eval: list[Example]

    def eval_fingerprint(self) -> str:
        """A short hash of the eval set, logged so trials can be shown to share it."""
        h = hashlib.sha256("\n".join(f"{e.question}\t{e.answer}" for e in self.eval).encode())
        return h.hexdigest()[:12]


def _read_local(path: Path) -> list[dict[str, Any]]:
    import pyarrow as pa

    if not path.exists():
        raise DataError(f"{path}: no such file (expected a local .jsonl/.parquet/.csv or a hub dataset name)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".json"):
            import pyarrow.json as pj

            table = pj.read_json(path)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.csv as pc

            table = pc.read_csv(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}{_bad_json_line(path) if suffix in ('.jsonl', '.json') else ''}: "
                        f"cannot parse as {suffix[1:]}: {e}") from None
    return table.to_pylist()


def _bad_json_line(path: Path) -> str:
    """pyarrow reports a row, not a line: find the first line that is not a JSON object."""
    with path.open(encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    if not isinstance(json.loads(line), dict):
                        return f":{n}"
                except json.JSONDecodeError:
                    return f":{n}"
    return ""


def _read_hub(ds: DatasetSpec) -> list[dict[str, Any]]:
    from datasets import load_dataset

    try:
        return list(load_dataset(ds.source, ds.subset, split=ds.split))
    except Exception as e:  # the hub raises many types; the user needs the name and the reason
        raise DataError(f"{ds.source} (split {ds.split!r}): cannot load from the hub: {e}") from None


def load_rows(ds: DatasetSpec) -> list[dict[str, Any]]:
    """Raw rows of one data set, from the builtin set, a local file, or the hub."""
    if ds.source in BUILTIN:
        return _read_local(BUILTIN[ds.source])
    if ds.source.startswith("builtin:"):
        raise DataError(f"{ds.source}: unknown builtin data set (known: {', '.join(BUILTIN)})")
    path = Path(ds.source).expanduser()
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        return _read_local(path)
    return _read_hub(ds)


def _clean_reasoning(text: str) -> str:
    # The seed strips the source's own <think> tags: the template adds ours around it.
    return text.replace("<think>", "").replace("</think>", "").strip()


def to_examples(ds: DatasetSpec, rows: list[dict[str, Any]]) -> list[Example]:
    """Map columns, drop rows without a usable answer, apply the numeric filter and the limit."""
    cols = ds.columns
    needed = [c for c in (cols.question, cols.answer, cols.reasoning, cols.kind) if c]
    if rows:
        missing = [c for c in needed if c not in rows[0]]
        if missing:
            raise DataError(
                f"{ds.source}: missing column(s) {', '.join(missing)}; available: {', '.join(rows[0])}. "
                "Map them under data.<set>.columns"
            )
    out: list[Example] = []
    for row in rows:
        q, a = row.get(cols.question), row.get(cols.answer)
        if not isinstance(q, str) or a is None or not str(a).strip():
            continue
        a = str(a).strip()
        if ds.numeric_only and parse_number(a) is None:
            continue
        r = row.get(cols.reasoning) if cols.reasoning else None
        kind = row.get(cols.kind) if cols.kind else None
        out.append(Example(q, a, _clean_reasoning(r) if isinstance(r, str) else None,
                           str(kind) if kind is not None else None))
    if not out:
        raise DataError(f"{ds.source}: no usable rows (after the numeric filter: {ds.numeric_only})")
    return out


def _key(q: str) -> str:
    return " ".join(q.split()).lower()


def load_datasets(spec: DataSpec) -> Datasets:
    """All three sets of a sweep: SFT, GRPO and the disjoint held-out eval set."""
    grpo_all = to_examples(spec.grpo, load_rows(spec.grpo))
    rng = random.Random(spec.seed)
    if spec.eval.source is not None:
        eval_pool = to_examples(spec.eval.source, load_rows(spec.eval.source))
        rng.shuffle(eval_pool)
        eval_set = eval_pool[: spec.eval.size]
    else:
        order = list(range(len(grpo_all)))
        rng.shuffle(order)
        eval_set = [grpo_all[i] for i in order[: spec.eval.size]]
        if len(eval_set) >= len(grpo_all):
            raise DataError(
                f"{spec.grpo.source}: {len(grpo_all)} usable rows cannot hold out data.eval.size="
                f"{spec.eval.size} and still train; lower data.eval.size"
            )
    held = {_key(e.question) for e in eval_set}
    grpo = [e for e in grpo_all if _key(e.question) not in held]
    rng.shuffle(grpo)
    if spec.grpo.limit:
        grpo = grpo[: spec.grpo.limit]
    sft: list[Example] = []
    if spec.sft is not None:
        sft_all = to_examples(spec.sft, load_rows(spec.sft))
        sft = [e for e in sft_all if _key(e.question) not in held and e.reasoning is not None]
        if not sft:
            raise DataError(f"{spec.sft.source}: no SFT rows with reasoning (set data.sft.columns.reasoning)")
        rng.shuffle(sft)
        if spec.sft.limit:
            sft = sft[: spec.sft.limit]
    return Datasets(sft=sft, grpo=grpo, eval=eval_set)
