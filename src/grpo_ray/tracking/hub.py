"""``grpo-ray push RUN REPO_ID``: the exported winner (``<run>/best/``) as a Hugging Face Hub model repo.

What goes up: the model card as the repo's README.md (the export's card, which names the
hyperparameters, data, rewards and metrics, plus Hub metadata and a GGUF usage snippet for
llama.cpp and Ollama), the GGUF files, the Modelfile, best.json and export.json; and, unless
``gguf_only``, the LoRA adapter (``lora/``) and the merged 16-bit model (``merged16/``).

Refusals (a :class:`PushError`, one line; the CLI exits 2): a run without ``best/best.json``, no
token (HF_TOKEN or the one ``hf auth login`` saved), a repo id the Hub would refuse, and a repo
that already holds other content (unless ``overwrite``: then it is replaced whole, files that
are not in this push are deleted). A repo already holding exactly these files is left alone.

The token is read by huggingface_hub from the environment or its token file and passed to it
only; it is never printed or written.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from grpo_ray import storage
from grpo_ray.run_dir import (
    BEST_JSON,
    EXPORT_JSON,
    LORA_DIR,
    MERGED_DIR,
    MODEL_CARD,
    MODELFILE,
    best_json_path,
    best_path,
    spec_resolved_path,
)

WEIGHT_DIRS = (LORA_DIR, MERGED_DIR)
ALWAYS = (MODELFILE, BEST_JSON, EXPORT_JSON)


class PushError(RuntimeError):
    """A push the user must change something for; the message is one self-contained line."""


@dataclass
class PushResult:
    repo_id: str
    url: str
    files: list[str]  # paths in the repo, sorted
    uploaded: bool  # False: the repo already held exactly these files
    private: bool
    notes: list[str] = field(default_factory=list)


def _git_blob_sha1(path: Path) -> str:
    """The git object id the Hub lists for a file stored without LFS."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hub_card(card: str, repo_id: str, ggufs: list[str], base_model: str | None) -> str:
    """The repo README: Hub metadata (YAML front matter), the export's model card, and how to run the GGUF."""
    tags = ["grpo-ray", "grpo", "reasoning", "gguf", "lora"]
    meta = ["---", "library_name: peft", "tags:", *[f"- {t}" for t in tags]]
    if base_model:
        meta.append(f"base_model: {base_model}")
    meta += ["---", ""]
    # Ollama and llama-cli users want the quantized file when there is one.
    quantized = [g for g in ggufs if not g.endswith(("-f16.gguf", "-bf16.gguf", "-f32.gguf"))]
    quant = (quantized or ggufs or [None])[0]
    usage = ["", "## Run the GGUF", ""]
    if quant:
        tag = quant.rsplit("-", 1)[-1].removesuffix(".gguf").upper()
        usage += [
            "llama.cpp:",
            "",
            "```bash",
            f"hf download {repo_id} {quant} --local-dir .",
            f'llama-cli -m {quant} -p "What is 12 * 7?"',
            f"# or straight from the Hub: llama-cli -hf {repo_id}:{tag}",
            "```",
            "",
            "Ollama (the Modelfile carries the chat template, system prompt and stop tokens):",
            "",
            "```bash",
            f"hf download {repo_id} {quant} Modelfile --local-dir {repo_id.split('/')[-1]}",
            f"cd {repo_id.split('/')[-1]} && ollama create {repo_id.split('/')[-1].lower()} -f Modelfile",
            f"ollama run {repo_id.split('/')[-1].lower()}",
            "```",
            "",
            "GGUF files here: " + ", ".join(f"`{g}`" for g in ggufs) + ".",
        ]
    else:
        usage += ["This export has no GGUF file (export.gguf was empty)."]
    return "\n".join(meta) + card.rstrip() + "\n" + "\n".join(usage) + "\n"


def stage(best_dir: Path, dest: Path, repo_id: str, gguf_only: bool, base_model: str | None) -> list[str]:
    """Lay out the repo's files under ``dest`` (links to the export's files, the README written);
    returns the repo paths."""
    best = json.loads((best_dir / BEST_JSON).read_text())
    ggufs = sorted(p.name for p in best_dir.glob("*.gguf"))
    card_path = best_dir / MODEL_CARD
    card = card_path.read_text() if card_path.is_file() else f"# {best.get('run')}: best trial {best.get('trial_id')}\n"
    (dest / "README.md").write_text(hub_card(card, repo_id, ggufs, base_model))
    names = [*ggufs, *(n for n in ALWAYS if (best_dir / n).is_file())]
    if not gguf_only:
        names += [d for d in WEIGHT_DIRS if (best_dir / d).is_dir()]
    for n in names:
        src, dst = best_dir / n, dest / n
        if src.is_dir():
            for f in src.rglob("*"):
                if f.is_file():
                    target = dst / f.relative_to(src)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _link(f, target)
        else:
            _link(src, dst)
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())


def _link(src: Path, dst: Path) -> None:
    """A hard link where the file system allows it (GGUF and merged weights are gigabytes)."""
    try:
        os.link(src, dst)
    except OSError:
        import shutil

        shutil.copy2(src, dst)


def _remote_files(api: Any, repo_id: str) -> dict[str, Any] | None:
    """The repo's files on the Hub (path -> sibling with its oid), or None when it does not exist.
    The .gitattributes the Hub puts in every new repo does not count as content."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.model_info(repo_id, files_metadata=True)
    except RepositoryNotFoundError:
        return None
    return {s.rfilename: s for s in (info.siblings or []) if s.rfilename != ".gitattributes"}


def _differs(remote: dict[str, Any], local: Path, files: list[str]) -> list[str]:
    """Repo paths whose content on the Hub is not this push's: extra, missing or changed."""
    if not remote:
        return []
    out = sorted(set(remote) ^ set(files))
    for name in set(remote) & set(files):
        s, p = remote[name], local / name
        same = s.lfs.sha256 == _sha256(p) if s.lfs is not None else s.blob_id == _git_blob_sha1(p)
        if not same:
            out.append(name)
    return sorted(out)


def push_run(run: str, repo_id: str, private: bool = False, gguf_only: bool = False, overwrite: bool = False,
             progress: Callable[[str], None] = lambda s: None) -> PushResult:
    """Upload ``<run>/best/`` to the Hub model repo ``repo_id`` (see the module docstring)."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    run = storage.normalize(run)
    best_uri = best_path(run)
    if not storage.exists(best_json_path(run)):
        raise PushError(f"{run}: no best/best.json (the sweep or its export has not finished); nothing to push")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise PushError(f"REPO_ID {repo_id!r}: {str(e).splitlines()[0]}") from None
    token = get_token()
    if not token:
        raise PushError("no Hugging Face token: set HF_TOKEN (a write token) or run `hf auth login`, then push again")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="grpo-ray-push-") as tmp:
        if storage.is_uri(best_uri):
            progress(f"copying {best_uri} here first")
            best_dir = Path(tmp, "best")
            storage.copy_dir(best_uri, str(best_dir))
        else:
            best_dir = Path(best_uri)
        spec_file = spec_resolved_path(run)
        base = _hub_base(storage.read_text(spec_file)) if storage.exists(spec_file) else None
        local = Path(tmp, "repo")
        local.mkdir()
        files = stage(best_dir, local, repo_id, gguf_only, base)
        try:
            remote = _remote_files(api, repo_id)
            different = _differs(remote or {}, local, files)
            if remote and different and not overwrite:
                shown = ", ".join(different[:5]) + (f" and {len(different) - 5} more" if len(different) > 5 else "")
                raise PushError(f"{repo_id} already exists with other content ({shown} differ); pass --overwrite to "
                                "replace it with this run's files, or push to another REPO_ID")
            url = f"{api.endpoint}/{repo_id}"
            if remote and not different:
                return PushResult(repo_id, url, files, uploaded=False, private=private,
                                  notes=["the repo already holds exactly these files; nothing uploaded"])
            if remote is None:
                progress(f"creating {'private ' if private else ''}model repo {repo_id}")
                url = str(api.create_repo(repo_id, private=private, repo_type="model"))
            best = json.loads((best_dir / BEST_JSON).read_text())
            progress(f"uploading {len(files)} files")
            api.upload_folder(
                repo_id=repo_id, folder_path=str(local), repo_type="model",
                commit_message=f"grpo-ray push: {best.get('run')} best trial {best.get('trial_id')}",
                # --overwrite replaces the repo whole: a file of an earlier push must not pass as this run's.
                delete_patterns=["*"] if overwrite else None,
            )
        except HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                raise PushError(f"the Hub refused the token for {repo_id} (HTTP {status}): use a token with write "
                                "access to that namespace (HF_TOKEN or `hf auth login`)") from None
            raise PushError(f"the Hub answered an error for {repo_id}: {str(e).splitlines()[0]}") from None
    return PushResult(repo_id, url, files, uploaded=True, private=private)


def _hub_base(spec_text: str) -> str | None:
    """The spec's model.source when it is a Hub id (not builtin:, a local path or a .gguf file)."""
    import yaml

    src = str(((yaml.safe_load(spec_text) or {}).get("model") or {}).get("source") or "")
    if not src or ":" in src or src.startswith((".", "/", "~")) or src.endswith(".gguf") or src.count("/") != 1:
        return None
    return None if Path(src).exists() else src
