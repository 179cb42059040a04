"""`grpo-ray push` against a local HTTP stand-in for the Hugging Face Hub API.

The Hub is the one part no machine here can reach, so :class:`StandInHub` (an ``http.server``
in a thread) answers the endpoints huggingface_hub's ``HfApi`` calls for this upload: repo
info (``/api/models/<id>``, with file metadata), repo creation, README metadata validation,
``preupload``, the Git LFS batch API and the LFS object PUT (the "basic" transfer), the file
tree (for ``--overwrite``'s deletions) and the NDJSON ``commit``. It stores what it is sent,
checks each LFS object's sha256, and answers 401 to any token but the expected one. The
client is huggingface_hub itself, unmodified; ``HF_HUB_DISABLE_XET=1`` makes it use the LFS
protocol instead of Xet storage (the Xet CAS protocol is not emulated here).

The run pushed is the real export of the tracked sweep (conftest.py ``tracked_run``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from conftest import REPO

TOKEN = "hf_standInWriteToken0123456789"
LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")


class StandInHub:
    """The Hub API endpoints an upload_folder push uses, backed by dicts (repo -> path -> bytes)."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}  # id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.calls: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: Any = None, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {TOKEN}" or self.path.startswith("/lfs-upload/"):
                    return True
                self._send(401, {"error": "Invalid credentials in Authorization header"},
                           {"X-Error-Message": "Invalid credentials in Authorization header"})
                return False

            def do_GET(self) -> None:  # noqa: N802
                hub.calls.append(("GET", self.path))
                if not self._authorized():
                    return
                url = urlparse(self.path)
                parts = url.path.split("/")
                if url.path.startswith("/api/models/") and "/tree/" in url.path:
                    repo = hub.repos.get("/".join(parts[3:5]))
                    if repo is None:
                        return self._not_found()
                    return self._send(200, [{"type": "file", "path": p, "size": len(b), "oid": _blob(b)}
                                            for p, b in sorted(repo["files"].items())])
                if url.path.startswith("/api/models/"):
                    repo_id = "/".join(parts[3:5])
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._not_found()
                    return self._send(200, {"id": repo_id, "sha": _commit_sha(repo), "private": repo["private"],
                                            "siblings": [hub.sibling(p, b) for p, b in sorted(repo["files"].items())]})
                self._send(404, {"error": f"stand-in: no GET {url.path}"})

            def _not_found(self) -> None:
                self._send(404, {"error": "Repository not found"},
                           {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})

            def do_PUT(self) -> None:  # noqa: N802
                hub.calls.append(("PUT", self.path))
                oid = self.path.rsplit("/", 1)[-1]
                data = self._body()
                if hashlib.sha256(data).hexdigest() != oid:
                    return self._send(400, {"error": "sha256 mismatch"})
                hub.lfs[oid] = data
                self._send(200, {})

            def do_POST(self) -> None:  # noqa: N802
                hub.calls.append(("POST", self.path))
                if not self._authorized():
                    return
                url = urlparse(self.path)
                body = self._body()
                if url.path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                    if repo_id in hub.repos:
                        return self._send(409, {"error": "You already created this model repo"})
                    private = req.get("visibility") == "private" or bool(req.get("private"))
                    hub.repos[repo_id] = {"private": private, "commits": [], "files": {
                        ".gitattributes": b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"}}
                    return self._send(200, {"url": f"http://{self.headers['Host']}/{repo_id}", "name": repo_id})
                if url.path == "/api/validate-yaml":
                    return self._send(200, {"errors": [], "warnings": []})
                if url.path.endswith(".git/info/lfs/objects/batch"):
                    req = json.loads(body)
                    assert req["operation"] == "upload" and "basic" in req["transfers"]
                    host = self.headers["Host"]
                    return self._send(200, {"transfer": "basic", "objects": [
                        {"oid": o["oid"], "size": o["size"]} if o["oid"] in hub.lfs else
                        {"oid": o["oid"], "size": o["size"],
                         "actions": {"upload": {"href": f"http://{host}/lfs-upload/{o['oid']}", "header": {}}}}
                        for o in req["objects"]]})
                parts = url.path.split("/")
                repo_id = "/".join(parts[3:5])
                if url.path.startswith("/api/models/") and repo_id not in hub.repos:
                    return self._not_found()
                if "/preupload/" in url.path:
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular",
                         "shouldIgnore": False} for f in files]})
                if "/commit/" in url.path:
                    return self._send(200, hub.commit(repo_id, body, self.headers["Host"]))
                self._send(404, {"error": f"stand-in: no POST {url.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def sibling(self, path: str, data: bytes) -> dict[str, Any]:
        lfs = path.endswith(LFS_SUFFIXES)
        return {"rfilename": path, "size": len(data), "blobId": _blob(data),
                **({"lfs": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}}
                   if lfs else {})}

    def commit(self, repo_id: str, body: bytes, host: str) -> dict[str, Any]:
        repo = self.repos[repo_id]
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        for x in lines:
            v = x["value"]
            if x["key"] == "file":
                repo["files"][v["path"]] = base64.b64decode(v["content"])
            elif x["key"] == "lfsFile":
                repo["files"][v["path"]] = self.lfs[v["oid"]]  # KeyError -> 500: committed before uploaded
            elif x["key"] == "deletedFile":
                repo["files"].pop(v["path"])
        repo["commits"].append(header["summary"])
        sha = _commit_sha(repo)
        return {"commitUrl": f"http://{host}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}

    def __enter__(self) -> StandInHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def _blob(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _commit_sha(repo: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps([len(repo["commits"]), sorted(repo["files"])]).encode()).hexdigest()


@pytest.fixture(scope="module")
def hub():
    with StandInHub() as h:
        yield h


def _push(hub: StandInHub, *args: str, token: str | None = TOKEN, tmp: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    # HF_HOME: no token saved by a real `hf auth login` on this machine can stand in for a missing one.
    env |= {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1"}
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "grpo_ray.cli", "push", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_push_uploads_best_with_the_card_ggufs_modelfile_and_weights(tracked_run, hub, tmp_path):
    run, best_dir = tracked_run["run"], tracked_run["run"] / "best"
    best = json.loads((best_dir / "best.json").read_text())
    r = _push(hub, str(run), "someone/tracked-best", "--private", tmp=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    repo = hub.repos["someone/tracked-best"]
    assert repo["private"] is True and len(repo["commits"]) == 1
    files = set(repo["files"]) - {".gitattributes"}
    local = {str(p.relative_to(best_dir)) for p in best_dir.rglob("*") if p.is_file()}
    expected = {n for n in local if n.endswith(".gguf") or n in ("Modelfile", "best.json", "export.json", "README.md")
                or n.startswith(("lora/", "merged16/"))}
    assert files == expected and "tracked-f16.gguf" in files
    assert any(f.startswith("lora/") and f.endswith(".safetensors") for f in files)
    assert any(f.startswith("merged16/") and f.endswith(".safetensors") for f in files)
    for name in files - {"README.md"}:  # byte for byte what the export wrote (LFS objects sha-checked)
        assert hashlib.sha256(repo["files"][name]).hexdigest() == _sha(best_dir / name), name
    card = repo["files"]["README.md"].decode()
    assert card.startswith("---\n") and "- gguf" in card  # Hub metadata
    assert (best_dir / "README.md").read_text().strip() in card  # the export's card, whole
    for k in best["hyperparameters"]:  # hyperparameters
        assert f"- `{k}`: " in card, k
    assert "builtin:math_mini" in card and "`check_answer`" in card  # data and rewards
    assert "eval_accuracy" in card and "reward" in card  # metrics
    assert "llama-cli -m tracked-f16.gguf" in card and "ollama create" in card and "Modelfile" in card
    assert "hf download someone/tracked-best tracked-f16.gguf" in card
    assert f"{len(files)} files" in r.stdout and "someone/tracked-best" in r.stdout


def test_push_again_is_a_no_op_and_other_content_is_refused_unless_overwrite(tracked_run, hub, tmp_path):
    run = str(tracked_run["run"])
    repo_id = "someone/tracked-again"
    assert _push(hub, run, repo_id, tmp=tmp_path).returncode == 0
    r = _push(hub, run, repo_id, tmp=tmp_path)
    assert r.returncode == 0 and "up to date" in r.stdout, r.stderr[-2000:]
    assert len(hub.repos[repo_id]["commits"]) == 1  # nothing committed the second time
    # --gguf-only is other content: no lora/ or merged16/.
    r = _push(hub, run, repo_id, "--gguf-only", tmp=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"{repo_id} already exists with other content" in r.stderr and "--overwrite" in r.stderr
    assert len(hub.repos[repo_id]["commits"]) == 1
    r = _push(hub, run, repo_id, "--gguf-only", "--overwrite", tmp=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    files = set(hub.repos[repo_id]["files"])
    assert not any(f.startswith(("lora/", "merged16/")) for f in files)  # replaced whole, not merged
    assert {"README.md", "tracked-f16.gguf", "Modelfile", "best.json", ".gitattributes"} <= files


def test_push_refusals_are_one_line_with_exit_2(tracked_run, hub, tmp_path):
    run = str(tracked_run["run"])
    empty = tmp_path / "runs" / "unfinished"
    empty.mkdir(parents=True)
    cases = [  # (arguments, token, what the one line must say)
        ((run, "someone/no-token"), None, "no Hugging Face token: set HF_TOKEN"),
        ((run, "someone/bad-token"), "hf_wrong", "the Hub refused the token for someone/bad-token (HTTP 401)"),
        ((str(empty), "someone/unfinished"), TOKEN, "no best/best.json"),
        ((run, "not a repo id"), TOKEN, "REPO_ID 'not a repo id'"),
    ]
    for args, token, says in cases:
        r = _push(hub, *args, token=token, tmp=tmp_path)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "hf_wrong" not in r.stderr + r.stdout
        assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1, r.stderr  # one line
    assert not {"someone/no-token", "someone/bad-token", "someone/unfinished"} & set(hub.repos)
