"""The run folder: one run at a time, checked before training, and an earlier run's files replaced whole.

A run writes ``config.yaml`` when the fit starts and its artifacts, ``report.png`` and ``summary.json`` when it
ends. Two runs into one folder would mix those files; a re-run would silently replace a finished run, or leave an
earlier method's weights beside a later summary. So:

* :func:`lock_run_folder` takes an exclusive ``flock`` on ``<folder>/.lock`` for the whole fit. A second run
  into the folder fails at once; the operating system drops the lock when the process ends, so a killed run
  leaves no stale lock behind.
* :func:`check_finished_run` refuses a folder that holds a finished run (a ``summary.json``) unless the user
  asked to overwrite it (or resumes it from a checkpoint); :func:`clear_earlier_run` then removes that run's files.
* :func:`check_output_dir` finds a folder that cannot be written before any training, not after it.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from pathlib import Path

from lightning_custom.errors import UserInputError
from lightning_custom.runs.summary import SUMMARY_FILE, read_summary_if_any
from lightning_custom.runtime.io import remove_path

LOCK_FILE = ".lock"
# Files and folders a run (or a command run on it afterwards) writes into its folder, besides those its
# summary.json names: removed whole when a new run overwrites the folder. Files not listed are left alone, so a
# run folder pointed at a folder of the user's own files loses nothing else.
RUN_FILES = ("summary.json", "config.yaml", "report.png", "metrics.json", "before_after.png", "exact_probes.json")
RUN_FOLDERS = ("samples", "samples_during_training", "eval", "replay", "checkpoints", "lightning_logs")
RUN_FILE_PATTERNS = ("hpc_ckpt_*.ckpt", ".*.tmp")
# Lock files held by this process (path -> open descriptor); the same process may ask again (the CLI, then the
# RunSummary callback in the same fit).
_held: dict[Path, int] = {}
# Lock files held by this process, for its child processes (DDP workers) to see: {"<path>": <pid>}.
LOCKS_ENV = "LIGHTNING_CUSTOM_RUN_FOLDER_LOCKS"


def is_remote(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a URL (``s3://...``): Lightning writes there through fsspec; it is not checked or locked."""
    return "://" in str(folder)


def is_writable(folder: Path) -> bool:
    """Whether this process may create files in the existing ``folder``.

    Tried for real (a temporary folder made and removed at once): the permission bits do not tell for root, a
    read-only mount or a pseudo file system such as ``/proc``.
    """
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        tempfile.TemporaryDirectory(prefix=".write-check-", dir=folder).cleanup()
    except OSError:
        return False
    return True


def check_output_dir(folder: str | os.PathLike, argument: str) -> Path:
    """Check that ``folder`` is, or can be created as, a folder this process can write to; create nothing.

    Args:
        folder: the output location.
        argument: the option that set it (``--trainer.default_root_dir``), named in the error.

    Returns:
        ``folder`` as a path.

    Raises:
        UserInputError: a file is in the way, or the folder (or the nearest existing one above it) is not writable.
    """
    path = Path(folder).expanduser()
    if is_remote(folder):
        return path
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = f"{path} is a file" if existing == path else f"cannot create {path}: {existing} is a file"
        raise UserInputError(f"{argument}: {where}, not a folder; choose a folder")
    if not existing.exists():
        raise UserInputError(f"{argument}: cannot create {path}: {existing} is a broken link")
    if not is_writable(existing):
        where = f"{path} is" if existing == path else f"cannot create {path}: {existing} is"
        raise UserInputError(f"{argument}: {where} not writable; choose a folder you can write to")
    return path


def _held_by_parent(lock_path: Path) -> bool:
    """Whether the parent process holds ``lock_path`` (DDP workers run inside their launcher's lock)."""
    try:
        holders = json.loads(os.environ.get(LOCKS_ENV, "{}"))
    except ValueError:
        return False
    return isinstance(holders, dict) and holders.get(str(lock_path)) == os.getppid()


def _set_env_holder(lock_path: Path, pid: int | None) -> None:
    try:
        holders = json.loads(os.environ.get(LOCKS_ENV, "{}"))
    except ValueError:
        holders = {}
    holders = holders if isinstance(holders, dict) else {}
    if pid is None:
        holders.pop(str(lock_path), None)
    else:
        holders[str(lock_path)] = pid
    if holders:
        os.environ[LOCKS_ENV] = json.dumps(holders)
    else:
        os.environ.pop(LOCKS_ENV, None)


def _holder_pid(lock_path: Path) -> str:
    try:
        return lock_path.read_text().strip()
    except OSError:
        return ""


def lock_run_folder(folder: str | os.PathLike, argument: str = "--trainer.default_root_dir") -> Path | None:
    """Take the run folder's lock (created if needed) for the rest of the fit; a second call is a no-op.

    The lock is an exclusive ``flock`` on ``<folder>/.lock``: it belongs to the process and ends with it, so a
    crashed or killed run never leaves a folder locked. Call on one process per run (global rank 0); a DDP
    worker whose launcher holds the lock does not take it again.

    Args:
        folder: the run folder.
        argument: the option that set it, named in the error.

    Returns:
        The lock file's path (``None`` for a remote folder, which is not locked).

    Raises:
        UserInputError: another run holds the folder.
    """
    if is_remote(folder):
        return None
    folder = check_output_dir(folder, argument)
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder.resolve() / LOCK_FILE
    if lock_path in _held or _held_by_parent(lock_path):
        return lock_path
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder_pid(lock_path)
            by = f" (process {holder})" if holder else ""
            raise UserInputError(
                f"{argument}: {folder} is in use by another run{by}; wait for it to end or choose another folder"
            ) from None
        # The holder before us may have removed the file while we waited to lock it: lock the file now there.
        try:
            same_file = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[lock_path] = fd
    _set_env_holder(lock_path, os.getpid())
    return lock_path


def unlock_run_folder(folder: str | os.PathLike) -> None:
    """Release the run folder's lock if this process holds it, and remove the lock file."""
    if is_remote(folder):
        return
    lock_path = Path(folder).expanduser().resolve() / LOCK_FILE
    fd = _held.pop(lock_path, None)
    if fd is None:
        return
    _set_env_holder(lock_path, None)
    # Unlink while still locked: a run waiting on the old file sees it is gone and locks the new one instead.
    lock_path.unlink(missing_ok=True)
    os.close(fd)


def check_finished_run(folder: str | os.PathLike, *, overwrite: bool, resuming: bool,
                       argument: str = "--trainer.default_root_dir") -> bool:
    """Refuse a folder that holds a finished run, unless it is overwritten or resumed.

    Args:
        folder: the run folder.
        overwrite: the user asked to replace an earlier run (``--overwrite``).
        resuming: the fit resumes from a checkpoint: the folder's run continues, nothing is replaced.
        argument: the option that set the folder, named in the error.

    Returns:
        Whether the folder holds an earlier run to clear (a finished one, with ``overwrite``).

    Raises:
        UserInputError: the folder holds a finished run and neither ``overwrite`` nor ``resuming`` is set.
    """
    summary = None if is_remote(folder) else read_summary_if_any(Path(folder).expanduser())
    if summary is None or resuming:
        return False
    if overwrite:
        return True
    if summary.get("stopped_by") == "interrupted" and summary.get("resume_checkpoint"):
        hint = f"resume it with --ckpt_path {summary['resume_checkpoint']}, or pass --overwrite true to replace it"
    else:
        hint = "pass --overwrite true (or set overwrite: true in the config) to replace it, or choose another folder"
    raise UserInputError(f"{argument}: {folder} holds a finished run ({SUMMARY_FILE}); {hint}")


def earlier_run_paths(folder: str | os.PathLike, extra: tuple[str | os.PathLike, ...] = ()) -> list[Path]:
    """The files and folders of an earlier run in ``folder``: what its summary names, plus what any run writes.

    Args:
        folder: the run folder.
        extra: more paths this run will write to (e.g. a checkpoint ``dirpath``); only those inside ``folder``
            are included.
    """
    folder = Path(folder).expanduser()
    summary = read_summary_if_any(folder) or {}
    names: set[str] = set(RUN_FILES) | set(RUN_FOLDERS)
    for key in ("artifacts", "files"):
        names |= {n for n in summary.get(key) or [] if isinstance(n, str)}
    paths = set()
    root = folder.resolve()
    for name in names:
        path = (folder / name).resolve()
        if path != root and root in path.parents:  # never the folder itself or anything outside it
            paths.add(folder / Path(name))
    for pattern in RUN_FILE_PATTERNS:
        paths |= set(folder.glob(pattern))
    for other in extra:
        path = Path(other).expanduser().resolve()
        if path != root and root in path.parents:
            paths.add(path)
    return sorted(p for p in paths if p.exists() or p.is_symlink())


def clear_earlier_run(folder: str | os.PathLike, extra: tuple[str | os.PathLike, ...] = ()) -> list[Path]:
    """Remove an earlier run's files from ``folder`` (see :func:`earlier_run_paths`); return what was removed.

    ``summary.json`` goes first, so an interrupted clearing never leaves a summary beside missing files.
    """
    paths = earlier_run_paths(folder, extra)
    paths.sort(key=lambda p: p.name != SUMMARY_FILE)
    for path in paths:
        remove_path(path)
    return paths
