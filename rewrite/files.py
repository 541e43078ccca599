"""Write every file peftc makes (adapters, ONNX and its external data, reports, plans, pictures)
whole or not at all, with the permissions a plain `open()` would give.

A writer gets a path inside a private staging folder next to the target. Only when it
finishes are its files renamed into place (side files such as ONNX external data first, so
the main file never points at missing data). A failed or killed write leaves the old file, or
none; the next write clears staging folders whose process is gone.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def plain_file_mode() -> int:
    """The mode `open(path, "w")` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _clear_stale(path: Path) -> None:
    """Remove staging folders that a write killed midway (its process is gone) left behind."""
    prefix = f".{path.name}."
    for stale in path.parent.glob(f"{prefix}*.partial"):
        pid = stale.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue  # another live process is writing there
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def staged(path: str | os.PathLike, make_parents: bool = False) -> Iterator[Path]:
    """Yield a staging path with `path`'s file name (so writers that read the suffix still
    work); when the block succeeds, move it and every other file written beside it into
    `path`'s folder, with the plain-`open()` mode. `path` is then the complete new file, and
    otherwise it is untouched."""
    path = Path(path).resolve()
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise FileNotFoundError(
            f"cannot write {path}: folder {path.parent} does not exist; create it first"
        )
    _clear_stale(path)
    stage = Path(
        tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".partial")
    )
    staged_file = stage / path.name
    try:
        yield staged_file
        if not staged_file.is_file():
            raise RuntimeError(f"the writer of {path} wrote no file")
        mode = plain_file_mode()
        # Side files first: the main file must never point at data that is not there yet.
        for written in sorted(stage.iterdir(), key=lambda p: p == staged_file):
            # Writers such as tempfile or safetensors may create private files; a teammate or
            # a serving process under another user must be able to read what peftc wrote.
            os.chmod(written, mode)
            os.replace(written, path.parent / written.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write `data` (text as UTF-8) to `path` whole or not at all; returns the path."""
    raw = data.encode() if isinstance(data, str) else data
    with staged(path) as tmp:
        tmp.write_bytes(raw)
    return Path(path)
