"""A deterministic corpus of varied strings for checking a tokenizer against llama.cpp.

Built from a fixed seed so that a failure names the same string on every machine. It covers
what tends to break SentencePiece re-implementations: whitespace runs (spaces, tabs, newlines,
``\\r\\n``, mixed), text right next to special or user-defined tokens, byte-fallback
characters (rare CJK, emoji with modifiers and ZWJ sequences, flags), combining accents,
right-to-left scripts, numbers with signs and separators, math, code, and the reasoning
format's ``<think>``/``<SOLUTION>`` tags.

:func:`corpus` returns plain text (round-trips through encode/decode); :data:`SPECIAL_TEXTS`
holds strings that spell control tokens (``<bos>``, ``<start_of_turn>``), which tokenizers
parse as those tokens, so only their ids are compared.
"""

from __future__ import annotations

import random

WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their been has would when "
    "capital France Paris number answer problem solution reasoning think therefore because "
    "apple banana train station kilometres hours minutes percent total remaining each "
    "twice half quarter dozen students teacher school garden river mountain computer "
    "internationalization unbelievable antidisestablishmentarianism pneumonia rhythm "
    "don't can't it's we'll they're O'Brien co-operate e-mail well-known state-of-the-art"
).split()

ACCENTED = (
    "café naïve façade résumé coöperate jalapeño Zürich São Paulo Kraków Ærøskøbing "
    "Dvořák Łódź İstanbul Ñandú crème brûlée smörgåsbord Ångström piñata"
).split()

SCRIPTS = [
    "日本語のテキストです。東京は日本の首都です。",
    "中文文本测试：北京是中国的首都。",
    "한국어 텍스트: 서울은 한국의 수도입니다.",
    "Привет, мир! Москва — столица России.",
    "Γειά σου κόσμε· η Αθήνα είναι πρωτεύουσα.",
    "مرحبا بالعالم، القاهرة عاصمة مصر.",
    "שלום עולם, ירושלים.",
    "नमस्ते दुनिया, दिल्ली भारत की राजधानी है।",
    "สวัสดีชาวโลก กรุงเทพมหานคร",
    "Xin chào thế giới, Hà Nội là thủ đô.",
    "𠜎𠜱𠝹𠱓 𡃁𡃤 (rare CJK extension B)",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",
]

EMOJI = [
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇫🇷", "🇯🇵", "❤️", "❤️‍🔥", "🏳️‍🌈", "🤖", "🧮", "✅", "⚠️", "🙂🙃", "🫠",
]

UNICODE_ODDITIES = [
    "\u00a0", "\u2009", "\u3000", "\u200b", "\u200d", "\ufeff", "\u0301", "\u0308", "e\u0301",
    "ﬁ", "①", "Ⅻ", "㎏", "\u2028", "\u00ad", "\x00", "\x07", "\x1b[31m", "\x7f", "�",
]

MATH = [
    "2 + 2 = 4", "x^2 + 3x - 4 = 0", "∫_0^1 x² dx = 1/3", "√(a² + b²)", "π ≈ 3.14159",
    "a ≤ b ≥ c ≠ d", "3 × 4 ÷ 2 = 6", "\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}",
    "f'(x) = 2x", "lim_{n→∞} (1 + 1/n)^n = e", "∑_{i=1}^{n} i = n(n+1)/2", "5! = 120",
    "(−3) · (−4) = 12", "10 % 3 == 1", "∀ε>0 ∃δ>0", "1e-9 < |x - y|",
]

CODE = [
    "def f(x):\n    return x ** 2\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}\n",
    "const add = (a, b) => a + b;  // sum",
    '{"name": "grpo", "lr": 5e-6, "steps": [1, 2, 3], "ok": true}',
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "if [ -f \"$HOME/.bashrc\" ]; then\n  source ~/.bashrc\nfi",
    "class Foo:\n    def __init__(self):\n        self.x = {'a': [1, 2]}\n",
    "<div class=\"row\"><td>1</td><td>2</td></div>",
    "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); }",
    "x = [i for i in range(10) if i % 2]\t# evens\r\n",
    "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
    "    \n        \n\t\t\n",
]

TAGS = ["<think>", "</think>", "<SOLUTION>", "</SOLUTION>"]

SPECIAL_TEXTS = [
    "<bos>Hello",
    "Hello<eos>",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "text<pad>more",
    "<unk> and <mask>",
    "[multimodal] <start_of_image>x<end_of_image>",
    "<unused0><unused17>",
    "a<bos><bos>b",
    "<bos>",
    "</s>",  # user-defined in Gemma's GGUF, but llama.cpp makes it a control (end-of-generation) token
]

# Characters llama.cpp and HF both map to the space escape; decode returns a space for them.
ID_ONLY_TEXTS = ["▁", "a▁b", "▁▁x", " ▁ "]


def _number(rng: random.Random) -> str:
    kind = rng.randrange(8)
    n = rng.randint(0, 10**rng.randint(1, 10))
    if kind == 0:
        return f"{n:,}"
    if kind == 1:
        return f"{rng.choice('+-−')}{n}"
    if kind == 2:
        return f"{rng.uniform(-1e4, 1e4):.{rng.randint(1, 6)}f}"
    if kind == 3:
        return f"${n:,}.{rng.randint(0, 99):02d}"
    if kind == 4:
        return f"{rng.randint(0, 100)}%"
    if kind == 5:
        return f"{rng.uniform(0, 10):.3e}"
    if kind == 6:
        return f"{rng.randint(1, 12)}/{rng.randint(1, 31)}/{rng.randint(1900, 2100)}"
    return str(n)


def _whitespace(rng: random.Random) -> str:
    kind = rng.randrange(7)
    if kind == 0:
        return " " * rng.randint(1, 70)
    if kind == 1:
        return "\t" * rng.randint(1, 35)
    if kind == 2:
        return "\n" * rng.randint(1, 35)
    if kind == 3:
        return "\r\n" * rng.randint(1, 3)
    if kind == 4:
        return "".join(rng.choice(" \t\n") for _ in range(rng.randint(2, 12)))
    if kind == 5:
        return " \u00a0 "
    return rng.choice([" ", "  ", "\n", "\n\n", "\t"])


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS + ACCENTED) for _ in range(rng.randint(3, 18))]
    if rng.random() < 0.5:
        words[0] = words[0].capitalize()
    return " ".join(words) + rng.choice([".", "!", "?", "", ",", ";", ":", "..."])


def _random_chars(rng: random.Random) -> str:
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF),
              (0x900, 0x97F), (0xE00, 0xE7F), (0x2000, 0x2BFF), (0x3040, 0x30FF), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF)]
    out = []
    for _ in range(rng.randint(1, 30)):
        lo, hi = rng.choice(blocks)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def _mixed(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(2, 8)):
        pick = rng.randrange(9)
        if pick == 0:
            parts.append(_sentence(rng))
        elif pick == 1:
            parts.append(_number(rng))
        elif pick == 2:
            parts.append(_whitespace(rng))
        elif pick == 3:
            parts.append(rng.choice(SCRIPTS))
        elif pick == 4:
            parts.append(rng.choice(EMOJI))
        elif pick == 5:
            parts.append(rng.choice(MATH))
        elif pick == 6:
            parts.append(rng.choice(TAGS))
        elif pick == 7:
            parts.append(rng.choice(UNICODE_ODDITIES))
        else:
            parts.append(rng.choice(CODE))
    sep = rng.choice(["", " ", "\n"])
    return sep.join(parts)


def _reasoning(rng: random.Random) -> str:
    a, b = rng.randint(1, 999), rng.randint(1, 999)
    work = f"{a} + {b} = {a + b}"
    ws = rng.choice(["", " ", "\n", "\n\n", "  "])
    return f"<think>{ws}{_sentence(rng)} {work}{ws}</think>{ws}<SOLUTION>{a + b}</SOLUTION>"


def corpus(n: int = 1200, seed: int = 20261125) -> list[str]:
    """``n`` distinct deterministic varied strings (fixed seed), fixed edge cases first."""
    rng = random.Random(seed)
    fixed = [
        "", " ", "  ", "a", "The capital of France is", " capital", "capital", "Hello, world!",
        "  leading spaces", "trailing spaces   ", "\ttab first", "new\nline", "two\n\nlines",
        "crlf\r\nline", " " * 31, " " * 32, " " * 70, "\n" * 31, "\n" * 40, "\t" * 40,
        "a  b   c    d", "x \n y \t z", "-1,234,567.89", "+42", "−7", "1,000,000", "3.14e-10",
        *SCRIPTS, *EMOJI, *UNICODE_ODDITIES, *MATH, *CODE, *TAGS,
        "".join(TAGS), "<think>\n</think>\n<SOLUTION>\n42\n</SOLUTION>\n",
        "<table><tr><td>1</td></tr></table>", "<b>bold</b> <i>it</i> <code>x</code>",
        "<sub>2</sub><sup>3</sup>", "<s>", "<0x41>", "[multimodal", "<start_of_turn",
    ]
    gens = [_sentence, _mixed, _mixed, _reasoning, _random_chars, _number, _whitespace]
    out = list(dict.fromkeys(fixed))
    seen = set(out)
    while len(out) < n:
        text = rng.choice(gens)(rng)
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out
