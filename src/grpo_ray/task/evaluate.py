"""Held-out evaluation: greedy generation through the backend, exact numeric match.

Accuracy counts a problem as solved when the text between the solution tags parses to the
same number as the reference answer; format rate counts completions in the exact format
(what ``match_format_exactly`` rewards).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from grpo_ray.task import template
from grpo_ray.task.data import Example
from grpo_ray.task.rewards import extract_solution, make_rewards, parse_number


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    format_rate: float
    n: int
    by_kind: dict[str, float] = field(default_factory=dict)  # accuracy per problem kind (data columns.kind)

    def accuracy_metrics(self, name: str) -> dict[str, float]:
        """``{name}`` (the accuracy) and ``{name}/<kind>`` for each problem kind."""
        return {name: self.accuracy} | {f"{name}/{k}": v for k, v in self.by_kind.items()}


def score(completions: list[str], examples: list[Example], fmt: template.Format, eos_token: str | None) -> EvalResult:
    """Score completions against the held-out examples (pure: no model needed)."""
    exact = make_rewards(fmt, eos_token)["match_format_exactly"]
    formatted = exact(prompts=[None] * len(completions), completions=completions)
    correct = 0
    kinds: dict[str, list[int]] = {}  # kind -> [solved, seen]
    for completion, ex in zip(completions, examples):
        guess = extract_solution(completion, fmt, eos_token)
        ref = parse_number(ex.answer)
        ok = int(guess is not None and ref is not None and parse_number(guess) == ref)
        correct += ok
        if ex.kind is not None:
            tally = kinds.setdefault(ex.kind, [0, 0])
            tally[0] += ok
            tally[1] += 1
    n = len(examples)
    return EvalResult(
        accuracy=correct / n if n else 0.0,
        format_rate=sum(1 for f in formatted if f > 0) / n if n else 0.0,
        n=n,
        by_kind={k: solved / seen for k, (solved, seen) in sorted(kinds.items())},
    )


def evaluate(backend: Any, examples: list[Example], fmt: template.Format, max_new_tokens: int) -> EvalResult:
    """Greedy completions for every held-out problem, scored."""
    prompts = [template.prompt_messages(e.question, fmt) for e in examples]
    completions = backend.generate(prompts, max_new_tokens)
    return score(completions, examples, fmt, getattr(backend.tokenizer, "eos_token", None))
