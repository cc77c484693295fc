"""The user cache directory and atomic writes, so an interrupted run never leaves a corrupt cache."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import platformdirs
import torch
from pydantic import BaseModel

from .errors import OutputExistsError, OutputWriteError

M = TypeVar("M", bound=BaseModel)


def _file_mode() -> int:
    """The mode ``open`` would give a new file under the process umask (read once, at import)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def cache_dir(*parts: str) -> Path:
    """``$LAYERWISE_CACHE`` or the platform's user cache directory, joined with ``parts`` and created."""
    root = Path(os.environ.get("LAYERWISE_CACHE") or platformdirs.user_cache_dir("layerwise"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def stable_hash(obj: Any, length: int = 16) -> str:
    """Short hex digest of a JSON-serialisable object (keys sorted), used in cache keys."""
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


# what the disk answers when it refuses a write: full, over quota, file too large, read-only, no permission
WRITE_REFUSALS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def write_errors(target: Path) -> Iterator[None]:
    """Turn the disk refusing a write while ``target`` is being written into one typed sentence; the
    atomic writers below have already removed what they started."""
    try:
        yield
    except OSError as exc:
        short_write = exc.errno is None and " written" in str(exc)  # numpy's tofile drops the errno
        if exc.errno not in WRITE_REFUSALS and not short_write:
            raise
        reason = "the disk took only part of a write (full, or over a file size limit)" if short_write else (
            exc.strerror or str(exc))
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(target) else ""
        raise OutputWriteError(f"Could not write {target}: {reason}{where}; nothing was left there.") from None


def writable_or_raise(path: Path) -> None:
    """Refuse before any work an output whose nearest existing folder cannot be written into."""
    folder = Path(path).expanduser().absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise OutputWriteError(f"Cannot write {path}: {folder} is not a folder this user may write into.")


def ensure_output_free(out: str | Path, overwrite: bool, what: str = "Output directory") -> None:
    """Fail before any work when the output (a directory, or a file named by ``what``) may not be replaced."""
    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{what} {out} already exists; pass --overwrite to replace it.")
    writable_or_raise(Path(out))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600 files; outputs should read like any other
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file name beside ``path`` for a writer that needs a path (a GGUF writer, llama.cpp's
    quantizer); renamed into place when the block succeeds, removed when it fails."""
    path = Path(path)
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""

    with write_errors(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            torch.save(obj, tmp)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)


def torch_load_or_none(path: Path) -> Any | None:
    """What ``atomic_torch_save`` stored at ``path``; None (and the entry removed) when missing or unreadable."""

    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError):
        path.unlink(missing_ok=True)
        return None


def cached_result(path: Path, result_type: type[M], compute: Callable[[], M]) -> tuple[M, bool]:
    """A pydantic result memoised as JSON at ``path``: (stored or freshly computed result, was_cached)."""
    stored = read_json(path)
    if stored is not None:
        return result_type.model_validate(stored), True
    result = compute()
    atomic_write_json(path, result.model_dump())
    return result, False


def read_json(path: Path) -> Any | None:
    """The parsed JSON at ``path``, or None when it is missing or unreadable (a stale cache entry)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def staged_directory(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success it replaces ``final``, on error it is removed.

    Callers check ``final`` for existence before starting work (see ``ensure_writable``);
    this only guarantees that no half-written directory is ever left at ``final``.
    """
    final = Path(final)
    with write_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
        try:
            yield staging
            if final.exists():
                if not overwrite:
                    raise FileExistsError(final)
                backup = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, backup)
                os.replace(staging, final)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                os.replace(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
