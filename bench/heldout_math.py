"""Deterministic generator of held-out arithmetic word problems for the "quality" benchmark.

Why: grpo-ray trains on src/grpo_ray/assets/math_mini.jsonl (scripts/make_offline_math.py), five
fixed templates ("X has a ... and buys b more", "gives b to", "fills a boxes with b each",
"shares a equally among b friends", a "packs ... change" two-step problem). Scoring on rows
drawn from those same templates only measures whether the model memorised the sentence shapes.
These problems keep the arithmetic (same operand sizes: operands up to ~60, products up to
~200, positive integer answers) but use other sentence structures, names, objects, units and
question forms, so the accuracy says whether the skill transfers. Each row carries a ``kind``
(``add``, ``sub``, ``mul``, ``div``, ``two_step``; n/5 of each) so the benchmark reports
accuracy per kind: two-step problems (two chained operations) are where a small model's
reasoning fails first, and one overall number would hide that.

Rows: ``{"question": str, "answer": str (a positive integer), "kind": str}``. No question is
repeated within a file; files made with different seeds share very few questions.

The benchmark's two files (generated once and committed under bench/data/):

    python3 bench/heldout_math.py --seed 101 --n 400 --out bench/data/heldout_val.jsonl \\
        --check-against src/grpo_ray/assets/math_mini.jsonl
    python3 bench/heldout_math.py --seed 202 --n 400 --out bench/data/heldout_test.jsonl \\
        --check-against src/grpo_ray/assets/math_mini.jsonl

The validation set (seed 101) is what the sweep optimises (it chooses the best configuration on
it); the test set (seed 202) is what the tutorial, SFT-alone and re-run numbers are reported on.
They are separate because picking the best of many trials on a set makes that set's accuracy an
optimistic estimate; the test set was never looked at while choosing.

``--check-against TRAIN.jsonl`` prints how many generated questions share a 6-word n-gram
(digits masked, so "has 12 apples and" and "has 40 apples and" count as the same phrase) with
any training question, and exits 1 if more than 2% do: a guard that the phrasing really differs.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

KINDS = ("add", "sub", "mul", "div", "two_step")

# Disjoint from math_mini's NAMES and ITEMS on purpose: a name or object seen in training is a cue.
NAMES = ["Priya", "Omar", "Sofia", "Mateo", "Yuki", "Noah", "Amara", "Lucas", "Zara", "Tomas", "Ingrid",
         "Ravi", "Mei", "Kofi", "Elena", "Diego", "Nadia", "Felix", "Leila", "Hugo"]
THINGS = ["shells", "tulips", "bricks", "postcards", "buttons", "beads", "acorns", "tiles", "crayons", "ribbons",
          "seashells", "pebbles"]

# Phrases of math_mini's templates that must never appear (checked at generation time as well).
BANNED = ("buys", "gives", "fills", "boxes", "shares", "equally among", "packs", "change", "how many cents",
          "are left", "have now", "in total", "each friend")

Problem = tuple[str, int]


def _add(r: random.Random) -> Problem:
    a, b = r.randint(2, 60), r.randint(2, 40)
    name, thing = r.choice(NAMES), r.choice(THINGS)
    day1, day2 = r.sample(["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"], 2)
    forms = [
        f"{name} walked {a} km on {day1} and {b} km on {day2}. "
        f"What distance did {name} cover over those two days, in km?",
        f"There were {a} {thing} on a shelf. Later {name} placed another {b} {thing} beside them. "
        f"Count the {thing} on the shelf at the end.",
        f"A water tank held {a} liters. After {b} liters were poured in, "
        f"what was the tank's volume of water, in liters?",
        f"In the morning a bakery baked {a} muffins, and in the afternoon it baked {b} more muffins. "
        f"What was the day's muffin count?",
    ]
    return r.choice(forms), a + b


def _sub(r: random.Random) -> Problem:
    b = r.randint(2, 40)
    a = b + r.randint(2, 60)  # a > b so the answer is positive, as in math_mini
    name = r.choice(NAMES)
    forms = [
        f"A library owned {a} novels and lent out {b} of them. How many novels remain on its shelves?",
        f"{name} had {a} dollars in a wallet and spent {b} dollars on lunch. "
        f"What amount stayed in the wallet, in dollars?",
        f"A rope measures {a} meters. {name} cuts off a {b}-meter piece. What length of rope remains, in meters?",
        f"A bus carried {a} passengers. At the next stop {b} passengers got off. "
        f"How many passengers stayed on the bus?",
    ]
    return r.choice(forms), a - b


def _mul(r: random.Random) -> Problem:
    a, b = r.randint(2, 12), r.randint(2, 15)  # products up to 180, like math_mini's 12 * 15
    name, thing = r.choice(NAMES), r.choice(THINGS)
    # Pairs drawn independently of the numbers widen the template space, so two seeds rarely collide.
    place, unit = r.choice([("classroom", "desks"), ("hall", "chairs"), ("orchard", "trees"),
                            ("parking lot", "cars"), ("vineyard", "vines")])
    box, content = r.choice([("carton", "eggs"), ("crate", "melons"), ("tray", "muffins"), ("jar", "olives"),
                             ("rack", "bottles")])
    forms = [
        f"A {place} is arranged in {a} rows, with {b} {unit} in every row. "
        f"What is the number of {unit} in the {place}?",
        f"{name} reads {b} pages every day for {a} days. How many pages does {name} read altogether?",
        f"One {box} holds {b} {content}. How many {content} are there in {a} such {box}s?",
        f"A set of {thing} costs {b} dollars. What do {a} of those sets cost, in dollars?",
    ]
    return r.choice(forms), a * b


def _div(r: random.Random) -> Problem:
    b = r.randint(2, 9)
    q = r.randint(2, 20)
    a = b * q  # divisible by construction: integer answers only
    name = r.choice(NAMES)
    people, groups = r.choice([("students", "teams"), ("hikers", "groups"), ("campers", "crews"),
                               ("players", "squads")])
    strip = r.choice(["ribbon", "wire", "strip of cloth", "paper streamer"])
    period = r.choice(["week", "day", "month"])
    plants = r.choice(["seedlings", "saplings", "herbs", "lettuces"])
    forms = [
        f"{a} {people} are split into {groups} of {b}. How many {groups} can be formed?",
        f"{name} cuts a {strip} {a} cm long into pieces that are each {b} cm long. How many pieces does that make?",
        f"{name} saved {a} dollars over {b} {period}s, putting aside the same amount every {period}. "
        f"What was the saving per {period}, in dollars?",
        f"{name} sets out {a} {plants} in {b} rows, with the same number in every row. "
        f"How many {plants} go in one row?",
    ]
    return r.choice(forms), q


def _two_step(r: random.Random) -> Problem:
    name = r.choice(NAMES)
    thing = r.choice(THINGS)
    form = r.randrange(5)
    if form == 0:  # multiply, then subtract
        rows, seats = r.randint(2, 12), r.randint(2, 15)
        taken = r.randint(1, rows * seats - 1)
        venue = r.choice(["theater", "stadium section", "lecture hall", "cinema"])
        return (f"A {venue} has {rows} rows of {seats} seats, and {taken} of the seats are occupied. "
                f"How many seats are empty?", rows * seats - taken)
    if form == 1:  # add, then divide exactly
        c = r.randint(2, 9)
        total = c * r.randint(2, 15)
        a = r.randint(1, total - 1)
        return (f"{name} collected {a} {thing} on Saturday and {total - a} on Sunday, then sorted all of them into "
                f"{c} jars holding the same number. How many {thing} went into each jar?", total // c)
    if form == 2:  # multiply, then add
        d, s, e = r.randint(2, 9), r.randint(5, 20), r.randint(2, 20)  # at most 200
        return (f"{name} rode {s} km a day for {d} days, and then {e} km on one final day. "
                f"What was the whole distance ridden, in km?", d * s + e)
    if form == 3:  # subtract, then multiply
        w = r.randint(2, 9)
        unsold = r.randint(2, 200 // w)
        sold = r.randint(2, 40)
        good = r.choice(["lamp", "chair", "suitcase", "speaker"])
        return (f"A shop stocked {unsold + sold} {good}s and sold {sold} of them. Every unsold {good} weighs {w} kg. "
                f"What do the unsold {good}s weigh together, in kg?", unsold * w)
    # divide exactly, then add
    b = r.randint(2, 9)
    q = r.randint(2, 15)
    extra = r.randint(2, 20)
    return (f"{name} splits {b * q} postcards evenly across {b} albums and later slips {extra} more into "
            f"the first album. How many postcards does the first album hold?", q + extra)


MAKERS: dict[str, Callable[[random.Random], Problem]] = {
    "add": _add, "sub": _sub, "mul": _mul, "div": _div, "two_step": _two_step}


def generate(seed: int, n: int) -> list[dict[str, str]]:
    """``n`` distinct problems, n/5 per kind (the first ``n % 5`` kinds get one extra), shuffled."""
    rng = random.Random(seed)
    kinds = [KINDS[i % len(KINDS)] for i in range(n)]
    rng.shuffle(kinds)
    seen: set[str] = set()
    rows = []
    for kind in kinds:
        for _ in range(1000):  # redraw duplicates; the template space is far larger than n
            q, ans = MAKERS[kind](rng)
            if q not in seen:
                break
        else:
            raise RuntimeError(f"could not draw a new {kind} problem; n={n} is too large for the templates")
        low = q.lower()
        assert ans > 0 and not any(re.search(rf"\b{re.escape(p)}\b", low) for p in BANNED), q
        seen.add(q)
        rows.append({"question": q, "answer": str(ans), "kind": kind})
    return rows


def _ngrams(text: str, k: int = 6) -> set[tuple[str, ...]]:
    # Digits masked: two questions that differ only in their numbers are the same phrasing.
    words = re.sub(r"\d+", "#", text.lower())
    toks = re.findall(r"[a-z#]+", words)
    return {tuple(toks[i:i + k]) for i in range(len(toks) - k + 1)}


def check_against(rows: list[dict[str, str]], train_path: str, k: int = 6) -> tuple[int, list[str]]:
    """How many rows share a k-word n-gram with any training question, and a few examples."""
    train: set[tuple[str, ...]] = set()
    for line in Path(train_path).read_text().splitlines():
        if line.strip():
            train |= _ngrams(json.loads(line)["question"], k)
    hits = [r["question"] for r in rows if _ngrams(r["question"], k) & train]
    return len(hits), hits[:5]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--out", help="JSONL file to write (its folder is created); omitted: only check and count")
    p.add_argument("--check-against", metavar="TRAIN_JSONL",
                   help="training set to compare phrasing with; exit 1 if >2%% of questions share a 6-word n-gram")
    args = p.parse_args(argv)

    rows = generate(args.seed, args.n)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} rows to {out}")
    print("kinds:", dict(sorted(Counter(r["kind"] for r in rows).items())))
    answers = [int(r["answer"]) for r in rows]
    print(f"answers: min {min(answers)}, max {max(answers)}")
    if args.check_against:
        n_hit, examples = check_against(rows, args.check_against)
        share = n_hit / len(rows) if rows else 0.0
        print(f"6-gram overlap with {args.check_against}: {n_hit}/{len(rows)} questions ({share:.1%})")
        for q in examples:
            print("  e.g.", q)
        if share > 0.02:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
