"""The four reward functions of Unsloth's Qwen3 GRPO tutorial, scored exactly, parsed in linear time.

The tutorial grades completions with two backtracking regexes::

    match_format  = rf"{reasoning_end}.*?{solution_start}(.+?){solution_end}[\\s]{{0,}}(?:{eos})?[\\s]{{0,}}$"
    match_numbers = rf"{solution_start}.*?[\\s]{{0,}}([-]?[\\d\\.\\,]{{1,}})"      (both MULTILINE | DOTALL)

which take quadratic to cubic time on long completions full of repeated tags. This module computes
what their ``search`` returns with ``str.find`` scans and two regexes that cannot backtrack far (the
equivalence argument is in :func:`extract_solution` and :func:`_number_guess`); ``tests/test_rewards.py``
checks it against the tutorial's code on a large random corpus. Model text is never evaluated, and the
reward functions never raise.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from grpo_ray.task.template import Format

RewardFn = Callable[..., list[float]]

BUILTIN_REWARDS: tuple[str, ...] = (
    "match_format_exactly", "match_format_approximately", "check_answer", "check_numbers",
)

# The tutorial's number, [-]?[\d\.\,]{1,}, minus the sign (checked by hand: the search runs 3x faster
# without the optional prefix). A greedy run of one class never backtracks, so the search is linear.
# \d (and \s below) are Unicode, exactly as in the tutorial's regexes.
_DIGITS = re.compile(r"[\d.,]+")


class RewardError(ValueError):
    """A reward name that is neither a builtin nor an importable callable."""


@functools.lru_cache(maxsize=64)
def _closing_tag(solution_end: str, eos: str | None) -> re.Pattern[str]:
    """A solution-end tag followed by the tutorial's tail ``[\\s]{0,}(?:EOS)?[\\s]{0,}$`` (MULTILINE).

    MULTILINE ``$`` holds before *any* ``\\n`` or at the very end, so ``\\s*$`` is ``\\s*(?:\\n|\\Z)``:
    text on a later line does not matter. Linear: the lookahead only backtracks through the whitespace
    run after one tag (and after the EOS), and the runs after distinct tags do not overlap.
    """
    line_end = r"\s*(?:\n|\Z)"
    tail = line_end if not eos else rf"{line_end}|\s*{re.escape(eos)}{line_end}"
    return re.compile(rf"{re.escape(solution_end)}(?={tail})")


def extract_solution(text: str, fmt: Format = Format(), eos_token: str | None = None) -> str | None:
    """The text ``check_answer`` grades: the tutorial's ``match_format.search(text).group(1)``, or None.

    Why the scan equals the regex: ``.*?`` and ``.+?`` match anything (DOTALL), so a match starting at a
    reasoning-end tag exists iff the first solution-start tag after it is followed (one character or
    more later) by a solution-end tag whose tail ends a line. Later starts only see later tags, so if
    the first reasoning end fails, every start fails. The lazy quantifiers then pick the first
    solution start and the first qualifying solution end.
    """
    if not isinstance(text, str):
        return None
    start = text.find(fmt.reasoning_end)
    if start == -1:
        return None
    sol = text.find(fmt.solution_start, start + len(fmt.reasoning_end))
    if sol == -1:
        return None
    body = sol + len(fmt.solution_start)
    # body + 1: the group (.+?) is never empty.
    end = _closing_tag(fmt.solution_end, eos_token or None).search(text, body + 1)
    return text[body : end.start()] if end else None


def _number_guess(text: str, fmt: Format) -> str | None:
    """The tutorial's ``match_numbers.search(text).group(1)``: the first number after the first solution tag.

    ``.*?`` skips ahead to the first place ``-?[\\d.,]+`` matches (whitespace never does), so the regex
    reduces to a search from the first solution-start tag (a later tag could only find less): the
    first run of digits, dots and commas, with the minus sign right before it if there is one.
    """
    sol = text.find(fmt.solution_start)
    if sol == -1:
        return None
    body = sol + len(fmt.solution_start)
    found = _DIGITS.search(text, body)
    if found is None:
        return None
    start = found.start() - 1 if found.start() > body and text[found.start() - 1] == "-" else found.start()
    return text[start : found.end()]


def parse_number(text: str) -> float | None:
    """``text`` as a finite float (surrounding space and thousands commas removed), else None."""
    if not isinstance(text, str):
        return None
    try:
        value = float(text.strip().replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _completion_text(completion: Any) -> str:
    """A completion's text: the string itself, or the first message's content (as the seed reads it)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        completion = completion[0]
    if isinstance(completion, Mapping):
        content = completion.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, (list, tuple)):  # multimodal-style parts: keep the text ones
            texts = (part.get("text") if isinstance(part, Mapping) else None for part in content)
            return "".join(t for t in texts if isinstance(t, str))
    return ""


def _texts(completions: Any) -> list[str]:
    """Every completion's text; nothing for a missing or malformed batch."""
    if isinstance(completions, (str, bytes)) or not isinstance(completions, Iterable):
        return []
    return [_completion_text(c) for c in completions]


def _answers(answer: Any, n: int) -> list[str | None]:
    """One reference answer per completion; None where there is none (missing column, short list)."""
    if isinstance(answer, (str, numbers.Number)):
        answer = [answer] * n
    if not isinstance(answer, Iterable):
        return [None] * n
    items: list[str | None] = []
    for item in itertools.islice(answer, n):
        if isinstance(item, numbers.Real) and not isinstance(item, bool):
            item = str(item)  # a numeric column: grade against its usual spelling
        items.append(item if isinstance(item, str) else None)
    return items + [None] * (n - len(items))


# Per-completion scores. A missing reference answer scores 0.0: no signal rather than a penalty.
def _format_exactly(text: str, answer: str | None, fmt: Format, eos: str | None) -> float:
    """3.0 when the completion ends (a line) with a solution block after the reasoning, else 0.0."""
    return 3.0 if extract_solution(text, fmt, eos) is not None else 0.0


def _format_approximately(text: str, answer: str | None, fmt: Format, eos: str | None) -> float:
    """+0.5 per tag seen exactly once, else -1.0 (the reasoning start is in the prompt: not scored)."""
    tags = (fmt.reasoning_end, fmt.solution_start, fmt.solution_end)
    return sum(0.5 if text.count(tag) == 1 else -1.0 for tag in tags)


def _answer(text: str, answer: str | None, fmt: Format, eos: str | None) -> float:
    """5.0 exact, 3.5 equal up to spaces, 2.0/1.5 within 10%/20%, -2.5 off, -4.5 not a number,
    -2.0 not in the exact format."""
    if answer is None:
        return 0.0
    guess = extract_solution(text, fmt, eos)
    if guess is None:
        return -2.0
    if guess == answer:
        return 5.0
    if guess.strip() == answer.strip():
        return 3.5
    try:  # float() parses; nothing is evaluated
        ratio = float(guess) / float(answer)
    except Exception:  # the tutorial's bare except: ValueError, ZeroDivisionError
        return -4.5
    if 0.9 <= ratio <= 1.1:
        return 2.0
    if 0.8 <= ratio <= 1.2:
        return 1.5
    return -2.5


def _numbers(text: str, answer: str | None, fmt: Format, eos: str | None) -> float:
    """3.5 if the first number after the solution tag equals the answer, -1.5 if not, -2.5 if there
    is none, 0.0 if either side does not parse."""
    if answer is None:
        return 0.0
    guess = _number_guess(text, fmt)
    if guess is None:
        return -2.5
    try:
        same = float(guess.strip().replace(",", "")) == float(answer.strip())
    except Exception:
        return 0.0
    return 3.5 if same else -1.5


_SCORERS: dict[str, Callable[[str, str | None, Format, str | None], float]] = dict(
    zip(BUILTIN_REWARDS, (_format_exactly, _format_approximately, _answer, _numbers))
)


class _Reward:
    """One tutorial reward bound to a format and EOS, called the TRL way.

    A class rather than a closure so it pickles: TRL's async GRPO and Ray ship rewards to other
    processes. ``__name__`` is the seed name because TRL logs ``rewards/<__name__>/mean``.
    """

    def __init__(self, name: str, fmt: Format, eos: str | None) -> None:
        self.__name__ = self.__qualname__ = name
        self.__doc__ = _SCORERS[name].__doc__
        self.kind, self.fmt, self.eos = name, fmt, eos

    def __call__(
        self, prompts: Any = None, completions: Any = (), answer: Any = None, **kwargs: Any
    ) -> list[float]:
        texts = _texts(completions)
        score = _SCORERS[self.kind]
        return [score(t, a, self.fmt, self.eos) for t, a in zip(texts, _answers(answer, len(texts)))]

    def __repr__(self) -> str:
        return f"<reward {self.__name__} eos={self.eos!r}>"


def make_rewards(fmt: Format = Format(), eos_token: str | None = None) -> dict[str, RewardFn]:
    """The four tutorial rewards bound to ``fmt``'s tags and the tokenizer's EOS, keyed by seed name.

    Each is called ``fn(prompts, completions, **kwargs) -> list[float]`` with the ``answer`` column
    in kwargs; completions may be strings or ``[{"role": "assistant", "content": str}]``.
    """
    eos = eos_token or None  # an empty EOS makes the tutorial's optional group match nothing
    return {name: _Reward(name, fmt, eos) for name in BUILTIN_REWARDS}


_EXPECTED = (
    f"expected a builtin reward ({', '.join(BUILTIN_REWARDS)}) "
    "or an importable 'package.module:function' that is callable"
)


def _import_reward(name: str) -> RewardFn:
    """The callable at ``package.module:function`` (or ``package.module.function``)."""
    module_name, sep, attr = name.partition(":")
    if not sep:
        module_name, _, attr = name.rpartition(".")
    if not module_name or not attr:
        raise RewardError(f"unknown reward {name!r}: {_EXPECTED}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # a user module may fail in any way while importing
        raise RewardError(f"reward {name!r}: cannot import {module_name!r} ({exc}); {_EXPECTED}") from exc
    for part in attr.split("."):  # "module:Class.method" works too
        if not hasattr(obj, part):
            raise RewardError(f"reward {name!r}: {module_name!r} has no attribute {attr!r}; {_EXPECTED}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward {name!r}: {attr!r} in {module_name!r} is not callable; {_EXPECTED}")
    return obj


def resolve_rewards(
    names: Iterable[str], fmt: Format = Format(), eos_token: str | None = None
) -> list[RewardFn]:
    """Reward functions for ``names``: builtin seed names bound to ``fmt``/``eos_token``, or import paths.

    A user reward is returned as is; TRL calls it ``fn(prompts=..., completions=..., **columns)``.
    Raises :class:`RewardError` for an unknown name or a failed import.
    """
    builtins = make_rewards(fmt, eos_token)
    resolved = []
    for name in names:
        key = name.strip() if isinstance(name, str) else ""
        if not key:
            raise RewardError(f"reward {name!r}: {_EXPECTED}")
        resolved.append(builtins[key] if key in builtins else _import_reward(key))
    return resolved


_DEFAULT = make_rewards()
match_format_exactly: RewardFn = _DEFAULT["match_format_exactly"]
match_format_approximately: RewardFn = _DEFAULT["match_format_approximately"]
check_answer: RewardFn = _DEFAULT["check_answer"]
check_numbers: RewardFn = _DEFAULT["check_numbers"]


FORMAT_RATE = "format_rate"  # an extra zero-weight reward: TRL then logs the format rate at every step


def format_rate_reward(fmt: Format, eos_token: str | None) -> RewardFn:
    """1.0 where ``match_format_exactly`` scores a completion, else 0.0 (weight 0: a measurement)."""
    exact = make_rewards(fmt, eos_token)["match_format_exactly"]

    def format_rate(prompts: Any = None, completions: Any = None, **kwargs: Any) -> list[float]:
        return [1.0 if s > 0 else 0.0 for s in exact(prompts=prompts, completions=completions, **kwargs)]

    return format_rate


@dataclass(frozen=True)
class Reward:
    """One reward of a trial.

    ``name``: as the spec writes it (a builtin or ``package.module:function``); ``func``: what TRL
    calls, and logs as ``rewards/<func.__name__>/mean``; ``weight``: the weight this trial trains
    with (the search may sample it); ``base_weight``: the spec's own, which the objective
    ``reward`` uses so that trials sampling different weights stay comparable.
    """

    name: str
    func: RewardFn
    weight: float
    base_weight: float

    @property
    def logged_as(self) -> str:
        return self.func.__name__


@dataclass(frozen=True)
class RewardSet:
    """A trial's rewards, resolved once, in the spec's order, plus the format-rate measurement.

    >>> rs = RewardSet.resolve([("check_answer", 2.0)], {"check_answer": 1.0})
    >>> [r.logged_as for r in rs.rewards], rs.weights, rs.base_weights
    (['check_answer'], [2.0, 0.0], {'check_answer': 1.0})
    >>> [f.__name__ for f in rs.funcs]  # what TRL gets: the rewards, then the zero-weight format rate
    ['check_answer', 'format_rate']
    """

    rewards: tuple[Reward, ...]
    format_rate: RewardFn

    @classmethod
    def resolve(cls, trial: Iterable[tuple[str, float]], base: Mapping[str, float], fmt: Format = Format(),
                eos_token: str | None = None) -> RewardSet:
        """``trial``: (name, weight) in the spec's order; ``base``: the spec's weights by name."""
        pairs = list(trial)
        funcs = resolve_rewards([n for n, _ in pairs], fmt, eos_token)
        rewards = tuple(Reward(n, f, float(w), float(base.get(n, w))) for (n, w), f in zip(pairs, funcs))
        return cls(rewards, format_rate_reward(fmt, eos_token))

    @property
    def funcs(self) -> list[RewardFn]:
        return [r.func for r in self.rewards] + [self.format_rate]

    @property
    def weights(self) -> list[float]:
        return [r.weight for r in self.rewards] + [0.0]

    @property
    def logged_names(self) -> list[str]:
        return [r.logged_as for r in self.rewards]

    @property
    def base_weights(self) -> dict[str, float]:
        """By the name TRL logs each reward under: the objective's weights."""
        return {r.logged_as: r.base_weight for r in self.rewards}
