"""Atomic file writing: a run never leaves a half-written artifact, a temporary file or a mixed set behind."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only where tensors are written: reading summaries stays light
    import torch


def default_mode(directory: bool = False) -> int:
    """The mode a new file (or folder) gets under the process umask, e.g. ``0o644`` (``0o755``) under ``022``."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def apply_default_modes(path: str | os.PathLike) -> None:
    """Give ``path``, and everything in it if it is a folder, the umask's default mode.

    Some writers create private files (safetensors writes 0600) and ``tempfile.mkdtemp`` folders are 0700; the
    files of a run should all be as readable as the ``config.yaml`` and ``summary.json`` beside them.
    """
    path = Path(path)
    if path.is_symlink() or not path.exists():
        return
    if not path.is_dir():
        path.chmod(default_mode())
        return
    path.chmod(default_mode(directory=True))
    for root, folders, files in os.walk(path):
        for name in folders:
            Path(root, name).chmod(default_mode(directory=True))
        for name in files:
            if not Path(root, name).is_symlink():
                Path(root, name).chmod(default_mode())


def remove_path(path: str | os.PathLike, ignore_errors: bool = False) -> None:
    """Remove ``path``: a folder with everything in it, or a file or link (nothing if it does not exist).

    Args:
        path: what to remove.
        ignore_errors: leave what cannot be removed inside a folder, instead of raising.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        path.unlink(missing_ok=True)


def replace_path(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move ``source`` onto ``target`` (a file or a folder, replaced whole), with the umask's default modes."""
    source, target = Path(source), Path(target)
    apply_default_modes(source)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    os.replace(source, target)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and for folders (the temporary name is created by the caller's writer). The result gets the
    umask's default mode, whatever mode the writer gave it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        replace_path(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def strict_json_value(data: Any) -> Any:
    """``data`` with every NaN or infinite float replaced by ``None`` (JSON has no such numbers; ``null`` is valid)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {key: strict_json_value(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json_value(value) for value in data]
    return data


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented, strict JSON (non-finite floats become ``null``), atomically."""
    text = json.dumps(strict_json_value(data), indent=2, sort_keys=False, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n")
    return Path(path)


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a safetensors file (contiguous CPU copies of ``tensors``, optional string ``metadata``), atomically."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(cpu, str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)


@contextlib.contextmanager
def staging_folder(destination: str | os.PathLike, prefix: str = ".final.") -> Iterator[Path]:
    """A temporary folder inside ``destination`` for files published together; removed however the block ends."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=destination))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: str | os.PathLike, destination: str | os.PathLike, last: str,
            stale: Iterable[str] = ()) -> list[str]:
    """Move every entry of ``staging`` into ``destination``, ``last`` (the file that names the set) last.

    ``destination/last`` is removed first, so a crash part-way leaves a folder without it (an unfinished run)
    rather than an old ``last`` beside new files; then ``stale`` entries of ``destination`` (top-level names
    an earlier set named that the new one does not) are removed before ``last`` is moved in.

    Returns:
        The names moved, ``last`` at the end.
    """
    staging, destination = Path(staging), Path(destination)
    names = sorted(p.name for p in staging.iterdir() if p.name != last)
    if not (staging / last).exists():
        raise FileNotFoundError(f"publish: {staging / last} was not written")
    (destination / last).unlink(missing_ok=True)
    for name in names:
        replace_path(staging / name, destination / name)
    for name in set(stale) - {*names, last}:
        if Path(name).name != name or name in ("", ".", ".."):
            continue  # only top-level entries of this folder
        remove_path(destination / name)
    replace_path(staging / last, destination / last)
    return [*names, last]


def default_cache_root() -> Path:
    """``$LIGHTNING_CUSTOM_CACHE/class_images``, else ``~/.cache/lightning_custom/class_images``."""
    root = os.environ.get("LIGHTNING_CUSTOM_CACHE")
    if root:
        return Path(root).expanduser() / "class_images"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "lightning_custom" / "class_images"
