"""The tutorial's reasoning format: tags, system prompt, chat template and prompt building.

The format follows Unsloth's GRPO tutorial: the model works between ``<think>`` and
``</think>`` and then answers between ``<SOLUTION>`` and ``</SOLUTION>``. The generation
prompt already ends with ``<think>``, so completions start inside the reasoning block.
Scoring lives in :mod:`grpo_ray.task.rewards`; this module only builds text.
"""

from __future__ import annotations

from dataclasses import dataclass

from grpo_ray.config.sections import (
    DEFAULT_SYSTEM_PROMPT,
    REASONING_END,
    REASONING_START,
    SOLUTION_END,
    SOLUTION_START,
    FormatSpec,
)


@dataclass(frozen=True)
class Format:
    """The tags and system prompt one sweep uses (all overridable from the spec)."""

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    reasoning_start: str = REASONING_START
    reasoning_end: str = REASONING_END
    solution_start: str = SOLUTION_START
    solution_end: str = SOLUTION_END


def format_of(spec: FormatSpec) -> Format:
    """The :class:`Format` a spec's ``format:`` section names."""
    return Format(**spec.model_dump())


def _jinja_literal(text: str) -> str:
    """Quote ``text`` as a Jinja string literal (repr-style escaping works in Jinja)."""
    return repr(text)


def chat_template(fmt: Format = Format(), bos_token: bool = False) -> str:
    """The tutorial's chat template: system prompt + EOS, user turns verbatim, assistant + EOS.

    ``bos_token`` prepends the tokenizer's BOS, for models (Gemma) whose tokenizer does not
    add it and that produce garbage without it.
    """
    bos = "{{ bos_token }}" if bos_token else ""
    return (
        bos
        + "{% if messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] + eos_token }}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}"
        "{{ " + _jinja_literal(fmt.system_prompt) + " + eos_token }}"
        "{% set loop_messages = messages %}"
        "{% endif %}"
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}"
        "{{ message['content'] }}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] + eos_token }}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ " + _jinja_literal(fmt.reasoning_start) + " }}"
        "{% endif %}"
    )


def prompt_messages(question: str, fmt: Format = Format()) -> list[dict[str, str]]:
    """The conversational prompt GRPO and evaluation feed the model."""
    return [
        {"role": "system", "content": fmt.system_prompt},
        {"role": "user", "content": question},
    ]


def sft_messages(question: str, reasoning: str, answer: str, fmt: Format = Format()) -> list[dict[str, str]]:
    """A full SFT example in the target format.

    The assistant turn starts *after* ``<think>`` would be emitted by the generation prompt,
    but in SFT the whole turn is written out, so it includes the opening tag.
    """
    completion = (
        f"{fmt.reasoning_start}{reasoning.strip()}{fmt.reasoning_end}"
        f"{fmt.solution_start}{answer.strip()}{fmt.solution_end}"
    )
    return prompt_messages(question, fmt) + [{"role": "assistant", "content": completion}]
