"""The run folder: one run at a time, an unwritable location found before training, an earlier run cleared whole."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal

import pytest

from lightning_custom.runs import run_folder
from lightning_custom.errors import UserInputError
from lightning_custom.runs.run_folder import (
    check_finished_run,
    check_output_dir,
    clear_earlier_run,
    lock_run_folder,
    unlock_run_folder,
)


def _hold_lock(folder: str, locked, release, release_sender) -> None:
    release_sender.close()  # the forked copy: the pipe ends when the test closes the last sender
    lock_run_folder(folder)
    locked.set()
    release.poll(120)  # until the test closes its end of the pipe
    os._exit(0)  # end without running the parent's (pytest's) exit handlers


@pytest.fixture
def other_run():
    """Start another process that holds a folder's lock, as a run in progress does; yields (folder -> process)."""
    context = multiprocessing.get_context("fork")  # the test's modules are already imported: no re-import
    started = []

    def start(folder):
        # The release is a pipe, not an Event: setting an Event that a killed process waited on blocks forever.
        locked, (release, release_sender) = context.Event(), context.Pipe(duplex=False)
        process = context.Process(target=_hold_lock, args=(str(folder), locked, release, release_sender))
        process.start()
        assert locked.wait(60), "the other process did not take the lock"
        started.append((process, release_sender))
        return process

    yield start
    for process, release_sender in started:
        release_sender.close()
        process.join(30)
        if process.is_alive():
            process.kill()


def test_a_second_run_is_refused_while_the_first_holds_the_folder(tmp_path, other_run):
    holder = other_run(tmp_path)
    with pytest.raises(UserInputError) as excinfo:
        lock_run_folder(tmp_path)
    message = str(excinfo.value)
    assert message.startswith(f"--trainer.default_root_dir: {tmp_path} is in use by another run")
    assert f"(process {holder.pid})" in message and "\n" not in message


def test_a_killed_run_leaves_no_stale_lock(tmp_path, other_run):
    holder = other_run(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(30)
    assert (tmp_path / ".lock").exists()  # the file stays, the lock does not
    lock_path = lock_run_folder(tmp_path)
    try:
        assert lock_path.read_text().strip() == str(os.getpid())
    finally:
        unlock_run_folder(tmp_path)
    assert not (tmp_path / ".lock").exists()


def test_the_same_process_may_lock_again_and_unlock_removes_the_file(tmp_path):
    first = lock_run_folder(tmp_path / "run")
    try:
        assert lock_run_folder(tmp_path / "run") == first  # the CLI, then RunSummary.setup in the same fit
    finally:
        unlock_run_folder(tmp_path / "run")
    assert not first.exists()
    unlock_run_folder(tmp_path / "run")  # a second release is a no-op


def test_child_processes_of_the_holder_do_not_lock_again(tmp_path):
    """A DDP worker started by the process that holds the folder runs inside that lock; another process does not."""
    lock_run_folder(tmp_path)
    try:
        context = multiprocessing.get_context("fork")
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_lock_and_report, args=(str(tmp_path), send))
        child.start()
        assert receive.poll(60) and receive.recv() == "ok"
        child.join(30)
        os.environ.pop(run_folder.LOCKS_ENV)  # what a process that is not our child sees
        child = context.Process(target=_lock_and_report, args=(str(tmp_path), send))
        child.start()
        assert receive.poll(60) and "is in use by another run" in receive.recv()
        child.join(30)
    finally:
        unlock_run_folder(tmp_path)


def _lock_and_report(folder: str, results) -> None:
    run_folder._held.clear()  # a forked child inherits the table; a spawned DDP worker starts without it
    try:
        lock_run_folder(folder)
        results.send("ok")
    except UserInputError as err:
        results.send(str(err))
    os._exit(0)


def test_a_file_valued_folder_is_one_line(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserInputError, match=r"^--summary\.output_dir: .*file\.txt is a file, not a folder"):
        check_output_dir(tmp_path / "file.txt", "--summary.output_dir")
    with pytest.raises(UserInputError, match=r"^--trainer\.default_root_dir: cannot create .*file\.txt/sub: "):
        check_output_dir(tmp_path / "file.txt" / "sub", "--trainer.default_root_dir")
    assert check_output_dir(tmp_path / "new" / "deeper", "--x") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_an_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    # Tests run as root, whom file modes do not stop: stand in for a folder this user cannot write to.
    monkeypatch.setattr(run_folder, "is_writable", lambda folder: folder != tmp_path)
    with pytest.raises(UserInputError, match=r"^--summary\.output_dir: cannot create .*/out: .* is not writable"):
        check_output_dir(tmp_path / "out", "--summary.output_dir")
    with pytest.raises(UserInputError, match=r"is not writable"):
        lock_run_folder(tmp_path)
    assert not (tmp_path / ".lock").exists()


def write_finished_run(folder, artifacts, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    for name in artifacts:
        (folder / name).write_bytes(b"weights")
    summary = {"method": "DreamBoothLoRA", "stopped_by": "dvar", "artifacts": list(artifacts), **fields}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_a_finished_run_is_refused_unless_overwritten_or_resumed(tmp_path):
    assert check_finished_run(tmp_path, overwrite=False, resuming=False) is False  # empty folder
    write_finished_run(tmp_path, ["pytorch_lora_weights.safetensors"])
    with pytest.raises(UserInputError) as excinfo:
        check_finished_run(tmp_path, overwrite=False, resuming=False)
    assert str(excinfo.value).startswith(f"--trainer.default_root_dir: {tmp_path} holds a finished run")
    assert "--overwrite" in str(excinfo.value)
    assert check_finished_run(tmp_path, overwrite=True, resuming=False) is True
    assert check_finished_run(tmp_path, overwrite=True, resuming=True) is False  # a resume replaces nothing


def test_an_interrupted_run_suggests_resuming(tmp_path):
    write_finished_run(tmp_path, [], stopped_by="interrupted", resume_checkpoint="runs/x/checkpoints/interrupted.ckpt")
    with pytest.raises(UserInputError, match="resume it with --ckpt_path runs/x/checkpoints/interrupted.ckpt"):
        check_finished_run(tmp_path, overwrite=False, resuming=False)


def test_clearing_removes_the_earlier_run_whole_and_nothing_else(tmp_path):
    run = tmp_path / "run"
    write_finished_run(run, ["pytorch_lora_weights.safetensors"], files=["summary.json", "config.yaml", "extra.bin"])
    for name in ("config.yaml", "report.png", "extra.bin", "hpc_ckpt_1.ckpt", "notes.txt"):
        (run / name).write_text("x")
    for folder in ("samples", "checkpoints", ".report.png.abc.tmp", "my_ckpts"):
        (run / folder).mkdir()
        (run / folder / "f").write_text("x")
    (tmp_path / "outside.txt").write_text("x")
    (run / "summary.json").write_text(json.dumps({"artifacts": ["pytorch_lora_weights.safetensors", "../outside.txt"],
                                                  "files": ["extra.bin"]}))
    removed = clear_earlier_run(run, extra=(run / "my_ckpts", tmp_path / "elsewhere"))
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # the user's own file stays
    assert (tmp_path / "outside.txt").exists()  # never anything outside the run folder
    assert removed[0].name == "summary.json"  # first: an interrupted clearing leaves no summary beside missing files
    assert len(removed) == 10


def test_python_users_get_the_lock_too(tmp_path, tiny_sd, concept_dir, other_run, single_thread):
    """L.Trainer with RunSummary (no CLI): a folder in use by another run is refused before any step."""
    import lightning as L

    from lightning_custom import ConceptDataModule, DVAREarlyStopping, RunSummary, TextualInversion
    from tests.conftest import data_kwargs, ti_kwargs, trainer_kwargs

    def fit(output_dir):
        trainer = L.Trainer(max_steps=3, callbacks=[DVAREarlyStopping(window=10, eval_every_n_steps=1),
                                                    RunSummary(output_dir=output_dir, report=False)],
                            **trainer_kwargs(tmp_path / "root"))
        trainer.fit(TextualInversion(**ti_kwargs(tiny_sd)), datamodule=ConceptDataModule(**data_kwargs(concept_dir)))
        return trainer

    other_run(tmp_path / "busy")
    with pytest.raises(UserInputError, match=r"^--summary\.output_dir: .*busy is in use by another run"):
        fit(str(tmp_path / "busy"))
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [".lock"]
    trainer = fit(str(tmp_path / "free"))
    assert trainer.global_step == 3 and (tmp_path / "free" / "summary.json").exists()
    assert not (tmp_path / "free" / ".lock").exists()  # released at the end of the fit


def test_remote_folders_are_left_to_fsspec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert lock_run_folder("s3://bucket/run") is None
    assert check_finished_run("s3://bucket/run", overwrite=False, resuming=False) is False
    unlock_run_folder("s3://bucket/run")
    assert not list(tmp_path.iterdir())  # no local "s3:" folder
