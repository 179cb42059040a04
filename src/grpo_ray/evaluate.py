"""Held-out evaluation: greedy generation through the backend, exact numeric match.

Accuracy counts a problem as solved when the text between the solution tags parses to the
same number as the reference answer; format rate counts completions in the exact format
(what ``match_format_exactly`` rewards).
"""

from __future__ import annotations

from dataclasses import dataclass

from grpo_ray import template
from grpo_ray.data import Example
from grpo_ray.rewards import extract_solution, make_rewards, parse_number


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    format_rate: float
    n: int
    samples: list[tuple[str, str, str]]  # (question, reference, completion) for the first few


def score(completions: list[str], examples: list[Example], fmt: template.Format, eos_token: str | None) -> EvalResult:
    """Score completions against the held-out examples (pure: no model needed)."""
    exact = make_rewards(fmt, eos_token)["match_format_exactly"]
    formatted = exact(prompts=[None] * len(completions), completions=completions)
    correct = 0
    for completion, ex in zip(completions, examples):
        guess = extract_solution(completion, fmt, eos_token)
        ref = parse_number(ex.answer)
        correct += int(guess is not None and ref is not None and parse_number(guess) == ref)
    n = len(examples)
    return EvalResult(
        accuracy=correct / n if n else 0.0,
        format_rate=sum(1 for f in formatted if f > 0) / n if n else 0.0,
        n=n,
        samples=[(e.question, e.answer, c) for e, c in list(zip(examples, completions))[:3]],
    )


def evaluate(backend, examples: list[Example], fmt: template.Format, max_new_tokens: int) -> EvalResult:
    """Greedy completions for every held-out problem, scored."""
    prompts = [template.prompt_messages(e.question, fmt) for e in examples]
    completions = backend.generate(prompts, max_new_tokens)
    return score(completions, examples, fmt, getattr(backend.tokenizer, "eos_token", None))
