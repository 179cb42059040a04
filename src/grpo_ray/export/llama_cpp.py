"""llama.cpp through its Python bindings (llama-cpp-python, the ``grpo-ray[llama]`` extra): whether
they are installed, its C-level log capture, and its quantizer for the K-quants (``q4_k_m`` ...).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from grpo_ray.export.base import ExportError


def _llama_cpp():
    """The llama_cpp module, or None when llama-cpp-python is not installed."""
    try:
        import llama_cpp  # noqa: PLC0415
    except ImportError:
        return None
    return llama_cpp


def llama_cpp_available() -> bool:
    return _llama_cpp() is not None


def require_llama_cpp(what: str) -> Any:
    mod = _llama_cpp()
    if mod is None:
        raise ExportError(
            f"{what} needs llama.cpp's Python bindings (llama-cpp-python), which are not installed; "
            "install the extra: pip install 'grpo-ray[llama]'"
        )
    return mod

@contextlib.contextmanager
def capture_fd2() -> Iterator[Callable[[], str]]:
    """Redirect the C-level stderr (llama.cpp's logs) to a temp file; yield a reader of it."""
    import sys

    with tempfile.TemporaryFile(mode="w+b") as tmp:
        try:
            sys.stderr.flush()
        except Exception:  # pragma: no cover
            pass
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)

        def read() -> str:
            tmp.flush()
            tmp.seek(0)
            return tmp.read().decode("utf-8", "replace")

        try:
            yield read
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def log_tail(text: str, n: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def quantize_gguf(src: Path, dst: Path, gguf_type: str, nthread: int | None = None) -> None:
    """llama.cpp's quantizer (``llama_model_quantize``) from a float GGUF to ``gguf_type`` (e.g. q4_k_m)."""
    lc = require_llama_cpp(f"GGUF type {gguf_type!r}")
    ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}", None)
    if ftype is None:
        raise ExportError(f"llama.cpp has no file type for {gguf_type!r}")
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = nthread or os.cpu_count() or 1
    with capture_fd2() as read:
        rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not Path(dst).is_file():
        raise ExportError(f"llama.cpp failed to quantize {src.name} to {gguf_type} (rc={rc}):\n{log_tail(read())}")


