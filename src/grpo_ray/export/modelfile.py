"""The Ollama ``Modelfile``: ``FROM`` the GGUF (or base + ``ADAPTER``), the chat template as a Go
template, the system prompt and the stop tokens.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from grpo_ray.export.base import ExportError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Ollama Modelfile


def _go_lit(s: str) -> str:
    return "" if not s else "{{ " + json.dumps(s, ensure_ascii=False) + " }}"


def _template_segments(tok, chat_template: str) -> dict[str, Any] | None:
    """Split the Jinja chat template's output into literal pieces around system/user/assistant turns."""
    S, U1, A1, U2 = "QXSYSQX", "QXU1QX", "QXA1QX", "QXU2QX"

    def render(msgs, gen):
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=chat_template)

    def pieces(text: str, marks: list[str]) -> list[str] | None:
        out, pos = [], 0
        for m in marks:
            j = text.find(m, pos)
            if j < 0:
                return None
            out.append(text[pos:j])
            pos = j + len(m)
        out.append(text[pos:])
        return out

    sys_m = {"role": "system", "content": S}
    u1, a1, u2 = ({"role": "user", "content": U1}, {"role": "assistant", "content": A1},
                  {"role": "user", "content": U2})
    try:
        r1 = pieces(render([sys_m, u1, a1, u2], False), [S, U1, A1, U2])
        r2 = render([sys_m, u1, a1, u2], True)
        r4 = pieces(render([sys_m, u1, a1], False), [S, U1, A1])
        r5 = pieces(render([{"role": "user", "content": U1}], True), [U1])
    except Exception as e:  # noqa: BLE001
        log.warning("chat template could not be rendered for the Modelfile: %s", e)
        return None
    if r1 is None or r4 is None:
        return None
    pre, s1, s2, s3, s4 = r1
    u_post = s4
    full1 = render([sys_m, u1, a1, u2], False)
    if not r2.startswith(full1):
        return None
    gen = r2[len(full1):]
    a_post = r4[-1]
    if not s2.startswith(u_post) or not s3.startswith(a_post):
        return None
    a_pre = s2[len(u_post):]
    u_pre = s3[len(a_post):]
    if not s1.endswith(u_pre):
        return None
    sys_end = s1[: len(s1) - len(u_pre)] if u_pre else s1
    default_system = None
    if r5 is not None:
        head = r5[0]
        if head.startswith(pre) and head.endswith(sys_end + u_pre) and len(head) > len(pre) + len(sys_end + u_pre):
            default_system = head[len(pre): len(head) - len(sys_end + u_pre)]
    return {"pre": pre, "sys_end": sys_end, "u_pre": u_pre, "u_post": u_post, "a_pre": a_pre,
            "a_post": a_post, "gen": gen, "default_system": default_system}


def ollama_template(seg: dict[str, Any], strip_bos: str | None = None) -> str:
    """Go template (Ollama) equivalent of the segmented chat template."""
    pre = seg["pre"]
    if strip_bos and pre.startswith(strip_bos):
        pre = pre[len(strip_bos):]  # llama.cpp adds BOS itself when the GGUF says add_bos
    d = seg["default_system"]
    if d is not None:
        system = (
            f"{_go_lit(pre)}{{{{ if .System }}}}{{{{ .System }}}}{{{{ else }}}}{_go_lit(d)}{{{{ end }}}}"
            f"{_go_lit(seg['sys_end'])}"
        )
    else:
        system = f"{{{{ if .System }}}}{_go_lit(pre)}{{{{ .System }}}}{_go_lit(seg['sys_end'])}{{{{ end }}}}"
    up, upo, ap, apo, gen = (_go_lit(seg[k]) for k in ("u_pre", "u_post", "a_pre", "a_post", "gen"))
    return (
        "{{- if .Messages }}\n"
        f"{{{{- /* system */ -}}}}{system}\n"
        "{{- range $i, $_ := .Messages }}\n"
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}\n"
        f"{{{{- if eq .Role \"user\" }}}}{up}{{{{ .Content }}}}{upo}{{{{ if $last }}}}{gen}{{{{ end }}}}\n"
        f"{{{{- else if eq .Role \"assistant\" }}}}{ap}{{{{ .Content }}}}{{{{ if not $last }}}}{apo}{{{{ end }}}}\n"
        "{{- end }}\n"
        "{{- end }}\n"
        "{{- else }}\n"
        f"{{{{- /* legacy prompt */ -}}}}{system}{up}{{{{ .Prompt }}}}{upo}{gen}\n"
        "{{- end }}{{ .Response }}"
    )


def _modelfile(gguf_name: str, template: str | None, system: str | None, stop: list[str],
               adapter: str | None = None) -> str:
    for label, text in (("TEMPLATE", template), ("SYSTEM", system)):
        if text and '"""' in text:
            raise ExportError(f'the Modelfile {label} cannot contain """ (Ollama\'s quoting)')
    lines = ["# Ollama Modelfile written by grpo-ray export", f"FROM ./{gguf_name}"]
    if adapter:
        lines.append(f"ADAPTER ./{adapter}")
    if template:
        lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for s in stop:
        lines.append(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf_name: str, tok: Any, chat_template: str | None, system_prompt: str | None,
                     add_bos: bool, adapter: str | None = None) -> dict[str, Any]:
    seg = _template_segments(tok, chat_template) if chat_template else None
    if seg is not None:
        template = ollama_template(seg, strip_bos=tok.bos_token if add_bos and tok.bos_token else None)
        system = system_prompt if system_prompt is not None else seg["default_system"]
        exact = True
    else:
        template = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}{{ .Response }}"
        system = system_prompt
        exact = False
    stop = [tok.eos_token] if tok.eos_token else []
    path.write_text(_modelfile(gguf_name, template, system, stop, adapter), encoding="utf-8")
    info: dict[str, Any] = {"template_mirrors_chat_template": exact, "stop": stop}
    if adapter:
        info.update({"from": gguf_name, "adapter": adapter})
    return info


