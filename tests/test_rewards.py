"""grpo_ray.task.rewards: exact agreement with the Unsloth tutorial's regex rewards, and robustness."""

from __future__ import annotations

import pickle
import random
import re
import sys
import time

import pytest

from grpo_ray.task import rewards
from grpo_ray.task.rewards import (
    BUILTIN_REWARDS,
    RewardError,
    check_answer,
    check_numbers,
    extract_solution,
    make_rewards,
    match_format_approximately,
    match_format_exactly,
    parse_number,
    resolve_rewards,
)
from grpo_ray.task.template import Format

QWEN_EOS = "<|endoftext|>"
TUTORIAL_FMT = Format(reasoning_start="<start_working_out>", reasoning_end="<end_working_out>")


# --------------------------------------------------------------------------------------------------
# The oracle: the Unsloth Qwen3 (4B) GRPO notebook's reward code, as published (unslothai/notebooks,
# nb/Qwen3_(4B)-GRPO.ipynb), wrapped in a factory for the tags and EOS. Kept here on purpose: the
# module must not carry the quadratic regexes. Only the debug print of check_numbers is left out.
# Note the tutorial hardcodes "</SOLUTION>" in solution_end_regex and interpolates tags unescaped.
# --------------------------------------------------------------------------------------------------
def seed_rewards(reasoning_end="</think>", solution_start="<SOLUTION>", solution_end="</SOLUTION>",
                 eos_token=QWEN_EOS):
    # Add optional EOS token matching
    solution_end_regex = r"</SOLUTION>[\s]{0,}" + \
        "(?:" + re.escape(eos_token) + ")?"

    match_format = re.compile(
        rf"{reasoning_end}.*?"\
        rf"{solution_start}(.+?){solution_end_regex}"\
        rf"[\s]{{0,}}$",
        flags = re.MULTILINE | re.DOTALL
    )

    def match_format_exactly(completions, **kwargs):
        scores = []
        for completion in completions:
            score = 0
            response = completion[0]["content"]
            # Match if format is seen exactly!
            if match_format.search(response) is not None: score += 3.0
            scores.append(score)
        return scores

    def match_format_approximately(completions, **kwargs):
        scores = []
        for completion in completions:
            score = 0
            response = completion[0]["content"]
            score += 0.5 if response.count(reasoning_end)   == 1 else -1.0
            score += 0.5 if response.count(solution_start)  == 1 else -1.0
            score += 0.5 if response.count(solution_end)    == 1 else -1.0
            scores.append(score)
        return scores

    def check_answer(prompts, completions, answer, **kwargs):
        responses = [completion[0]["content"] for completion in completions]

        extracted_responses = [
            guess.group(1)
            if (guess := match_format.search(r)) is not None else None \
            for r in responses
        ]

        scores = []
        for guess, true_answer in zip(extracted_responses, answer):
            score = 0
            if guess is None:
                scores.append(-2.0)
                continue
            # Correct answer gets 5 points!
            if guess == true_answer:
                score += 5.0
            # Match if spaces are seen, but less reward
            elif guess.strip() == true_answer.strip():
                score += 3.5
            else:
                # We also reward it if the answer is close via ratios!
                # Ie if the answer is within some range, reward it!
                try:
                    ratio = float(guess) / float(true_answer)
                    if   ratio >= 0.9 and ratio <= 1.1: score += 2.0
                    elif ratio >= 0.8 and ratio <= 1.2: score += 1.5
                    else: score -= 2.5 # Penalize wrong answers
                except:  # noqa: E722 -- verbatim seed
                    score -= 4.5 # Penalize
            scores.append(score)
        return scores

    match_numbers = re.compile(
        solution_start + r".*?[\s]{0,}([-]?[\d\.\,]{1,})",
        flags = re.MULTILINE | re.DOTALL
    )

    def check_numbers(prompts, completions, answer, **kwargs):
        responses = [completion[0]["content"] for completion in completions]

        extracted_responses = [
            guess.group(1)
            if (guess := match_numbers.search(r)) is not None else None \
            for r in responses
        ]

        scores = []
        for guess, true_answer in zip(extracted_responses, answer):
            if guess is None:
                scores.append(-2.5)
                continue
            # Convert to numbers
            try:
                true_answer = float(true_answer.strip())
                # Remove commas like in 123,456
                guess       = float(guess.strip().replace(",", ""))
                scores.append(3.5 if guess == true_answer else -1.5)
            except:  # noqa: E722 -- verbatim seed
                scores.append(0)
                continue
        return scores

    return {
        "match_format_exactly": match_format_exactly,
        "match_format_approximately": match_format_approximately,
        "check_answer": check_answer,
        "check_numbers": check_numbers,
        "match_format": match_format,
        "match_numbers": match_numbers,
    }


# --------------------------------------------------------------------------------------------------
# A random corpus built from the fragments that make the regexes interesting.
# --------------------------------------------------------------------------------------------------
NUMBERS = [
    "42", "-42", "40", "45", "36", "47", "50", "3.14", "-0.5", "1,234", "1,234.56", "-1,000,000",
    "12,34", "1.2.3", ",", ".", "-", "--5", "-.", "0", "00", "0.0", "-0", "7.", ".5", "1e5", "inf",
    "nan", "-inf", "1_000", "+7", "1/2", "\\frac{1}{2}", "\u0664\u0662", "\uff14\uff12", "9" * 400,
]
WHITESPACE = [
    " ", "  ", "\n", "\n\n", "\t", "\r", "\r\n", "\x0b", "\x0c", "\u2028", "\u00a0", "\u3000",
    "\x1c", "\x85", " \n ", "",
]
WORDS = [
    "The answer is", "x", "so", "$", "\\boxed{", "}", "\u00e9", "\U0001f600", "\u4e2d\u6587", "Let me think",
    "answer:", "Hence", "e\u0301\u0301", "\u202e", "\ud800", "\x00",
]


def tag_fragments(fmt: Format, eos: str) -> list[str]:
    tags = [fmt.reasoning_start, fmt.reasoning_end, fmt.solution_start, fmt.solution_end]
    partial = [t[:-1] for t in tags] + [t[1:] for t in tags] + ["</", "<", ">", "/"]
    nested = [fmt.solution_start * 2, fmt.solution_end * 2, fmt.reasoning_end * 2,
              fmt.solution_start + fmt.solution_end]
    return tags * 3 + partial + nested + [eos, eos, eos[:-1], "<|im_end|>", "</s>"]


def random_completion(rng: random.Random, fmt: Format, eos: str) -> tuple[str, str]:
    """A completion and the number it 'means' (so answers often hit the exact-match rungs)."""
    number = rng.choice(NUMBERS)
    if rng.random() < 0.6:  # near-well-formed, then mutated
        parts = ["Let me think", rng.choice(WHITESPACE), fmt.reasoning_end, rng.choice(WHITESPACE),
                 fmt.solution_start, rng.choice(WHITESPACE), number, rng.choice(WHITESPACE),
                 fmt.solution_end, rng.choice(WHITESPACE), rng.choice(["", eos]), rng.choice(WHITESPACE)]
        pools = [tag_fragments(fmt, eos), NUMBERS, WHITESPACE, WORDS]
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 5])):
            op = rng.random()
            pos = rng.randrange(len(parts) + 1)
            if op < 0.6:
                parts.insert(pos, rng.choice(rng.choice(pools)))
            elif op < 0.8 and parts:
                parts.pop(min(pos, len(parts) - 1))
            elif parts:
                parts.insert(pos, parts[min(pos, len(parts) - 1)])
    else:  # fragment soup
        pools = [tag_fragments(fmt, eos)] * 3 + [NUMBERS, WHITESPACE, WHITESPACE, WORDS]
        parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randrange(0, 25))]
    return "".join(parts), number


def random_answer(rng: random.Random, number: str) -> str:
    pick = rng.random()
    if pick < 0.45:
        return number
    if pick < 0.65:
        return rng.choice(["", " ", "\n"]) + number + rng.choice([" ", "\n", "  "])
    if pick < 0.95:
        return rng.choice(NUMBERS)
    return rng.choice(["abc", "", " 42 ", "0", "1e308", "1e-308"])


CONFIGS = [
    pytest.param(Format(), QWEN_EOS, QWEN_EOS, id="default-qwen-eos"),
    pytest.param(TUTORIAL_FMT, "</s>", "</s>", id="tutorial-tags-s-eos"),
    # The seed cannot take eos None; an EOS that never occurs is the same regex.
    pytest.param(Format(), None, "\x07never-eos\x07", id="default-no-eos"),
]


@pytest.mark.parametrize(("fmt", "eos", "seed_eos"), CONFIGS)
def test_matches_seed_oracle_on_random_corpus(fmt: Format, eos: str | None, seed_eos: str) -> None:
    rng = random.Random(20240531)
    seed = seed_rewards(fmt.reasoning_end, fmt.solution_start, fmt.solution_end, seed_eos)
    ours = make_rewards(fmt, eos)
    texts, answers = [], []
    for _ in range(6000):
        text, number = random_completion(rng, fmt, seed_eos if eos else QWEN_EOS)
        texts.append(text)
        answers.append(random_answer(rng, number))
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    prompts = [[{"role": "user", "content": "q"}]] * len(texts)
    seen: dict[str, set[float]] = {}
    for name in BUILTIN_REWARDS:
        expected = seed[name](prompts=prompts, completions=conversational, answer=answers)
        got = ours[name](prompts=prompts, completions=conversational, answer=answers)
        plain = ours[name](prompts=prompts, completions=texts, answer=answers)
        assert got == plain, f"{name}: plain strings and messages disagree"
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            assert e == g, f"{name} on {texts[i]!r} (answer {answers[i]!r}): seed {e}, ours {g}"
        seen[name] = set(got)
    # The corpus reaches every rung of every ladder, so the equality above means something.
    assert seen["match_format_exactly"] == {0.0, 3.0}
    assert {-2.0, 5.0, 3.5, 2.0, 1.5, -2.5, -4.5} <= seen["check_answer"]
    assert {-2.5, 3.5, -1.5, 0.0} <= seen["check_numbers"]
    assert {1.5, 0.0, -1.5, -3.0} <= seen["match_format_approximately"]
    # And extract_solution is the group the seed grades.
    for text in texts[:2000]:
        found = seed["match_format"].search(text)
        assert extract_solution(text, fmt, eos) == (found.group(1) if found else None), repr(text)


def test_ratio_ladder_boundaries_match_seed() -> None:
    values = ["8", "9", "10", "11", "12", "7.9", "12.1", "0", "-0", "-10", "-9", "1e308", "1e-308", "inf",
              "nan", "1,0", "x", " 10", "10 "]
    pairs = [(g, a) for g in values for a in values]
    texts = [f"</think><SOLUTION>{g}</SOLUTION>" for g, _ in pairs]
    answers = [a for _, a in pairs]
    seed, ours = seed_rewards(), make_rewards(Format(), QWEN_EOS)
    conversational = [[{"role": "assistant", "content": t}] for t in texts]
    for name in ("check_answer", "check_numbers"):
        assert ours[name](None, texts, answer=answers) == seed[name](None, conversational, answer=answers)
    assert set(ours["check_answer"](None, texts, answer=answers)) == {5.0, 3.5, 2.0, 1.5, -2.5, -4.5}


# --------------------------------------------------------------------------------------------------
# The tutorial's own examples and the MULTILINE / EOS corner cases.
# --------------------------------------------------------------------------------------------------
def test_brief_example_scores() -> None:
    text = "reasoning</think><SOLUTION>42</SOLUTION>"
    for completions in ([text], [[{"role": "assistant", "content": text}]]):
        scores = [fn(prompts=None, completions=completions, answer=["42"])[0]
                  for fn in (match_format_exactly, match_format_approximately, check_answer, check_numbers)]
        assert scores == [3.0, 1.5, 5.0, 3.5]


def test_tutorial_examples() -> None:
    assert extract_solution("Let me think!<end_working_out><SOLUTION>\n2\n</SOLUTION>", TUTORIAL_FMT) == "\n2\n"
    text = "<start_working_out>Let me think!<end_working_out><SOLUTION>  2  </SOLUTION>\n\n"
    assert extract_solution(text, TUTORIAL_FMT) == "  2  "
    fns = make_rewards(TUTORIAL_FMT, QWEN_EOS)
    assert fns["check_answer"](None, [text], answer=["2"]) == [3.5]
    for body, answer in [("  0.34  ", "0.34"), ("  123,456  ", "123456"), ("  -0.234  ", "-0.234"), ("17", "17")]:
        assert fns["check_numbers"](None, [f"<SOLUTION>{body}</SOLUTION>"], answer=[answer]) == [3.5]


@pytest.mark.parametrize(("tail", "eos", "matches"), [
    ("", None, True),
    ("  \n\n", None, True),
    ("\nmore text on the next line", None, True),  # MULTILINE $: end of any line
    (" trailing", None, False),
    ("\r", None, True),
    ("\rtext", None, False),
    ("\u2028text", None, False),  # only \n ends a line for $
    (QWEN_EOS, None, False),
    (QWEN_EOS, QWEN_EOS, True),
    (" " + QWEN_EOS + " \nx", QWEN_EOS, True),
    (QWEN_EOS + QWEN_EOS, QWEN_EOS, False),
    (QWEN_EOS + " x", QWEN_EOS, False),
])
def test_line_end_and_eos(tail: str, eos: str | None, matches: bool) -> None:
    text = f"r</think><SOLUTION>4</SOLUTION>{tail}"
    fns = make_rewards(Format(), eos)
    assert fns["match_format_exactly"](None, [text]) == [3.0 if matches else 0.0]
    assert extract_solution(text, Format(), eos) == ("4" if matches else None)


def test_minus_sign_belongs_to_a_tag_ending_in_minus() -> None:
    fmt = Format(solution_start="ANS-", solution_end="</SOLUTION>")
    seed, ours = seed_rewards(solution_start="ANS-"), make_rewards(fmt, QWEN_EOS)
    texts = ["</think>ANS-5</SOLUTION>", "</think>ANS--5</SOLUTION>", "</think>ANS- -5</SOLUTION>"]
    for answer in ("5", "-5"):
        expected = seed["check_numbers"](None, [[{"role": "assistant", "content": t}] for t in texts], [answer] * 3)
        assert ours["check_numbers"](None, texts, answer=[answer] * 3) == expected


def test_later_closing_tag_is_graded() -> None:
    text = "</think><SOLUTION>1</SOLUTION> x</SOLUTION>\n"
    assert extract_solution(text, Format()) == "1</SOLUTION> x"


def test_parse_number() -> None:
    assert parse_number(" 1,234.5 ") == 1234.5
    assert parse_number("-0.5") == -0.5
    assert parse_number("\u0664\u0662") == 42.0
    for bad in ["", "abc", "nan", "inf", "-Infinity", "1e400", "1+1", "__import__('os')", None, 42]:
        assert parse_number(bad) is None  # type: ignore[arg-type]


def test_rewards_pickle() -> None:
    # TRL's async GRPO and Ray send reward functions to other processes with plain pickle.
    for fn in make_rewards(TUTORIAL_FMT, QWEN_EOS).values():
        clone = pickle.loads(pickle.dumps(fn))
        assert clone.__name__ == fn.__name__
        text = "<end_working_out><SOLUTION>7</SOLUTION><|endoftext|>"
        assert clone(None, [text], answer=["7"]) == fn(None, [text], answer=["7"])


def test_names_and_defaults() -> None:
    assert BUILTIN_REWARDS == ("match_format_exactly", "match_format_approximately", "check_answer", "check_numbers")
    fns = make_rewards(TUTORIAL_FMT, QWEN_EOS)
    assert list(fns) == list(BUILTIN_REWARDS)
    for name in BUILTIN_REWARDS:
        assert fns[name].__name__ == name
        assert getattr(rewards, name).__name__ == name


# --------------------------------------------------------------------------------------------------
# Hostile output.
# --------------------------------------------------------------------------------------------------
HOSTILE_UNITS = [
    "</think><SOLUTION>1</SOLUTION>x",  # the seed takes ~100 s on 30 KB of this
    "</think>",
    "<SOLUTION>",
    "</think><SOLUTION>",
    "</think><SOLUTION>x</SOLUTION>  \t x",
    f"</SOLUTION>{QWEN_EOS} x",
    "1,",
]


@pytest.mark.parametrize("unit", HOSTILE_UNITS)
def test_300kb_repeated_tags_is_fast(unit: str) -> None:
    text = unit * (300_000 // len(unit))
    fns = make_rewards(Format(), QWEN_EOS)
    completions = [[{"role": "assistant", "content": text}]]
    start = time.perf_counter()
    scores = [fns[name](None, completions, answer=["1"]) for name in BUILTIN_REWARDS]
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, f"{elapsed:.3f} s"
    assert all(len(s) == 1 and isinstance(s[0], float) for s in scores)


def test_huge_well_formed_completion() -> None:
    text = "</think>" + "\u00e9\U0001f600 " * 100_000 + "<SOLUTION> 42 </SOLUTION>" + " " * 100_000 + QWEN_EOS + "\n"
    fns = make_rewards(Format(), QWEN_EOS)
    assert [fns[n](None, [text], answer=["42"])[0] for n in BUILTIN_REWARDS] == [3.0, 1.5, 3.5, 3.5]


def test_hostile_shapes_never_raise() -> None:
    rng = random.Random(7)
    unicode_soup = "".join(chr(rng.randrange(0, sys.maxunicode + 1)) for _ in range(20_000))
    completions = [
        unicode_soup,
        "</think><SOLUTION>" + unicode_soup + "</SOLUTION>",
        "</think><SOLUTION>1+1</SOLUTION>",
        None,
        [],
        [{"role": "assistant", "content": None}],
        [{"role": "assistant"}],
        [{"role": "assistant", "content": [{"type": "text", "text": "</think><SOLUTION>2</SOLUTION>"}]}],
        {"role": "assistant", "content": "</think><SOLUTION>2</SOLUTION>"},
        42,
        b"</think><SOLUTION>2</SOLUTION>",
    ]
    n = len(completions)
    answer_columns: list[object] = [
        None, ["2"] * n, ["2"], [None, 2, 2.0, object(), "0", "__import__('os').system('false')"] * 2,
        "2", 2, object(),
    ]
    for name in BUILTIN_REWARDS:
        fn = getattr(rewards, name)
        for answer in answer_columns:
            scores = fn(prompts=None, completions=completions, answer=answer)
            assert len(scores) == n and all(isinstance(s, float) for s in scores), (name, answer)
        assert len(fn(prompts=None, completions=completions)) == n  # no answer column at all
        assert fn(prompts=None, completions=None) == []
    assert check_answer(None, ["</think><SOLUTION>2</SOLUTION>"] * 2)  == [0.0, 0.0]  # nothing to grade against
    assert check_answer(None, ["</think><SOLUTION>1+1</SOLUTION>"], answer=["2"]) == [-4.5]  # never evaluated
    assert check_answer(None, ["</think><SOLUTION>5</SOLUTION>"], answer=["0"]) == [-4.5]  # division by zero
    assert check_numbers(None, ["</think><SOLUTION>2</SOLUTION>"], answer=[2]) == [3.5]  # numeric column


# --------------------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------------------
USER_REWARD_MODULE = '''
def length_penalty(prompts, completions, **kwargs):
    return [-0.001 * len(c if isinstance(c, str) else c[0]["content"]) for c in completions]

class Scorers:
    @staticmethod
    def one(prompts, completions, **kwargs):
        return [1.0] * len(completions)

NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    name = "grpo_ray_test_user_rewards"
    (tmp_path / f"{name}.py").write_text(USER_REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_resolve_builtins_and_import_paths(user_module: str) -> None:
    fns = resolve_rewards(
        ["check_answer", f"{user_module}:length_penalty", f"{user_module}.length_penalty",
         f"{user_module}:Scorers.one", "grpo_ray.task.rewards:check_numbers"],
        TUTORIAL_FMT, QWEN_EOS,
    )
    assert [f.__name__ for f in fns] == ["check_answer", "length_penalty", "length_penalty", "one", "check_numbers"]
    assert fns[1] is fns[2]
    completions = [[{"role": "assistant", "content": "abcd"}]]
    assert fns[1](prompts=[[]], completions=completions, answer=["1"]) == [-0.004]
    assert fns[3](prompts=[[]], completions=completions) == [1.0]
    # Builtins are bound to the given format: the tutorial's tags grade, the default ones do not.
    text = "<end_working_out><SOLUTION>7</SOLUTION>"
    assert fns[0](None, [text], answer=["7"]) == [5.0]


@pytest.mark.parametrize("name", [
    "check_anwser", "no_such_module_xyz:fn", "no_such_module_xyz.fn", "os:no_such_function",
    "{mod}:NOT_CALLABLE", "{mod}:", ":fn", "", "   ",
])
def test_bad_reward_names(name: str, user_module: str) -> None:
    name = name.format(mod=user_module)
    with pytest.raises(RewardError) as info:
        resolve_rewards([name], Format(), None)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert repr(name) in message
    assert "match_format_exactly" in message and "module:function" in message and "callable" in message


def test_reward_set_doctest():
    """task/rewards.py's RewardSet example (what a trial hands TRL, what the objective weighs) runs."""
    import doctest

    from grpo_ray.task import rewards

    result = doctest.testmod(rewards)
    assert result.attempted >= 3 and result.failed == 0
