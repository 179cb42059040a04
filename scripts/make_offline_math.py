"""Generate the small offline math set shipped with grpo-ray (src/grpo_ray/assets/math_mini.jsonl).

Arithmetic word problems with a worked solution and a numeric answer, deterministic from a
seed. A handful of rows carry non-numeric answers on purpose so the numeric filter has work.
Run: python scripts/make_offline_math.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kai", "Lena"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "stamps"]


def problem(rng: random.Random) -> dict[str, str]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(5)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    if kind == 0:
        q = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?"
        r, ans = f"{name} starts with {a} and adds {b}: {a} + {b} = {a + b}.", a + b
    elif kind == 1:
        a = a + b
        q = f"{name} has {a} {item} and gives {b} to {other}. How many {item} are left?"
        r, ans = f"{name} gives away {b} of {a}: {a} - {b} = {a - b}.", a - b
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 15)
        q = f"{name} fills {a} boxes with {b} {item} each. How many {item} is that in total?"
        r, ans = f"{a} boxes of {b} each: {a} * {b} = {a * b}.", a * b
    elif kind == 3:
        b = rng.randint(2, 9)
        a = b * rng.randint(2, 20)
        q = f"{name} shares {a} {item} equally among {b} friends. How many does each friend get?"
        r, ans = f"Split {a} into {b} equal parts: {a} / {b} = {a // b}.", a // b
    else:
        c = rng.randint(2, 9)
        q = (f"{name} buys {c} packs of {item} at {a} cents each and pays with {a * c + b} cents. "
             f"How many cents of change does {name} get?")
        r = f"The packs cost {c} * {a} = {a * c} cents. Change: {a * c + b} - {a * c} = {b}."
        ans = b
    return {"question": q, "reasoning": r, "answer": str(ans)}


def main(n: int = 1200, seed: int = 1234) -> None:
    rng = random.Random(seed)
    rows = [problem(rng) for _ in range(n)]
    for i in range(0, n, 100):  # a few symbolic answers the numeric filter must drop
        rows[i] = {"question": "Simplify (x + 1) + (x + 1).", "reasoning": "Collect terms.", "answer": "2x + 2"}
    out = Path(__file__).resolve().parents[1] / "src" / "grpo_ray" / "assets" / "math_mini.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
