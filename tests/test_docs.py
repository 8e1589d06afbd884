"""README.md and docs/*.md: every code block runs in a test or, where it cannot run here, is checked; every relative
link resolves.

A block runs as written (``test_the_block_runs_as_written``, slow: it trains) unless its info string says why not
(``tests/doc_blocks.py``: ``gpu``, ``download``, ``cluster``, ``long``, ``placeholder``, ``ci``) or names a test that
runs it with the tiny models (``test:FILE::NAME``). Every block, runnable or not, is checked in the default run:
python compiles, its imports exist and it reads no name its page never binds; shell passes ``bash -n``, every
``fit`` command line parses with the package's own CLI (``--print_config``: its config files exist and every option
is accepted), every other subcommand's and script's options exist, and the README's set-up and test commands are
what ``.ci/run`` does. Also: the options the prose names exist, the README's folder tour names existing paths, and
the README stays within 200 lines.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.doc_blocks import DOC_FILES, PARSE_ONLY, ROOT, Block, anchors, blocks, commands, relative_links

README = ROOT / "README.md"
ALL_BLOCKS = blocks()
SHELL = [b for b in ALL_BLOCKS if b.language == "bash"]


def test_the_readme_is_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200


def test_the_readme_folder_tour_names_existing_paths():
    """Each line of the README's tour names folders and modules that exist (bare names after a
    ``lightning_custom/...`` path are in that path's folder), so a move of the package's files shows up here."""
    tour = README.read_text().split("## The package\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in tour.splitlines() if line.startswith("- ")]
    assert 5 <= len(lines) <= 10
    for line in lines:
        base = ROOT
        for name in re.findall(r"`([^`]+)`", line):
            if not name.endswith((".py", "/")):
                continue  # a class or a file name, not a path
            if name.startswith("lightning_custom/"):
                base = (ROOT / name).parent
            assert list(ROOT.glob(name.rstrip("/"))) or list(base.glob(name.rstrip("/"))), f"{name}: {line}"


def test_every_block_runs_or_says_why_it_cannot():
    assert len(ALL_BLOCKS) >= 15 and any(b.runs_here for b in ALL_BLOCKS)
    sources = {p.name: p.read_text() for p in (ROOT / "tests").glob("test_*.py")}
    for block in ALL_BLOCKS:
        assert block.language in ("bash", "python"), f"{block.id}: language {block.language!r}"
        unknown = [w for w in block.words if w not in PARSE_ONLY]
        assert not unknown, f"{block.id}: unknown words {unknown} (known: {sorted(PARSE_ONLY)}, test:FILE::NAME)"
        for named in block.tests:
            file, _, test = named.partition("::")
            assert f"def {test}(" in sources.get(file, ""), f"{block.id}: no test {named}"
            # the named test reads the block from its page (not a copy of it)
            assert block.path.name in sources[file], f"{block.id}: {file} does not read {block.path.name}"


@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.language == "python"], ids=lambda b: b.id)
def test_python_blocks_compile_and_their_imports_exist(block):
    tree = compile(block.code, block.id, "exec", flags=ast.PyCF_ONLY_AST)
    imports = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    exec(compile(imports, block.id, "exec"), {})  # what a parse-only block imports exists too


def _bound_names(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


@pytest.mark.parametrize("page", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_use_only_names_they_or_earlier_blocks_of_their_page_define(page):
    """A block a reader copies needs its imports: every name it reads is a builtin, or bound in it or in an earlier
    python block of the same page (a page's blocks continue one another, as ``pipe`` does)."""
    import builtins

    known = set(dir(builtins))
    for block in blocks(page):
        if block.language != "python":
            continue
        tree = ast.parse(block.code)
        known |= _bound_names(tree)
        read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert not read - known, f"{block.id}: {sorted(read - known)} used but never imported or defined"


def test_shell_blocks_parse():
    for block in SHELL:
        result = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True, check=False)
        assert result.returncode == 0, f"{block.id}: {result.stderr}"


def _main(args: list[str]) -> tuple[int, str]:
    """Run the package's CLI in-process; (exit status, stdout and stderr)."""
    from lightning_custom.cli import main

    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(args)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return code, out.getvalue()


def _options(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--")]


def test_shell_blocks_name_existing_configs_scripts_and_options(monkeypatch):
    """What a block cannot run it still checks: each ``fit`` line parses in full (``--print_config`` validates its
    config files and every option against the classes), each other subcommand's options are in its ``--help``,
    each script exists and defines its options."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "argv", ["lightning_custom"])  # the CLI reads only the arguments it is given
    helps: dict[str, str] = {}
    checked = 0
    for block in SHELL:
        for args in commands(block):
            where = f"{block.id}: {shlex.join(args)}"
            if args[1:3] == ["-m", "lightning_custom"]:
                sub = args[3]
                for i, arg in enumerate(args):
                    if arg == "--config":
                        assert (ROOT / args[i + 1]).is_file(), f"{where}: no config {args[i + 1]}"
                if sub == "fit":
                    code, out = _main([*args[3:], "--print_config"])
                    assert code == 0 and "trainer:" in out, f"{where}:\n{out[-2000:]}"
                else:
                    if sub not in helps:
                        code, helps[sub] = _main([sub, "--help"])
                        assert code == 0, helps[sub]
                    for option in _options(args[4:]):
                        assert re.search(rf"(^|\s){re.escape(option)}\b", helps[sub]), f"{where}: {option}"
                checked += 1
            elif args[1:3] == ["-m", "pytest"] or args[1:3] == ["-m", "venv"]:
                assert "ci" in block.words, f"{where}: only the set-up and test commands of .ci/run"
            else:
                script = ROOT / args[1]
                assert script.is_file(), f"{where}: no script {args[1]}"
                source = script.read_text()
                for option in _options(args[2:]):
                    assert f'"{option}"' in source, f"{where}: {args[1]} has no option {option}"
                checked += 1
    assert checked >= 15


METHOD_CLASSES = ("TextualInversion", "DreamBooth", "DreamBoothLoRA", "CustomDiffusion", "TextualInversionFleet",
                  "DreamBoothLoRAFleet")


def test_options_named_in_the_prose_exist(monkeypatch):
    """Every ``--group.option`` the pages name outside code blocks is an option of ``fit``: in its ``--help``, or in
    ``--model.help`` of a method / ``--data.help ConceptDataModule`` (which list ``--model.x`` for
    ``--model.init_args.x``)."""
    monkeypatch.setattr(sys, "argv", ["lightning_custom"])
    helps = [_main(["fit", "--help"])[1], _main(["fit", "--data.help", "ConceptDataModule"])[1]]
    helps += [_main(["fit", "--model.help", name])[1] for name in METHOD_CLASSES]
    known = set(re.findall(r"--[\w.]+", "\n".join(helps))) | {f"--{g}.{k}" for g in ("model", "data")
                                                               for k in ("class_path", "help")}
    assert "--dvar.window" in known and "--model.placeholder_token" in known, helps[0][-2000:]
    for page in DOC_FILES:
        prose = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
        for option in set(re.findall(r"--(?:model|data|dvar|trainer|sample|live_report|summary)\.[\w.]+", prose)):
            option = re.sub(r"^--(model|data)\.init_args\.", r"--\1.", option.rstrip("."))
            if option.startswith("--trainer.callbacks."):
                continue  # a callback's own options, given after --trainer.callbacks+ (checked in the blocks)
            assert option in known, f"{page.name}: {option} is not an option of fit"


def test_the_readme_set_up_and_test_commands_are_what_ci_runs():
    """.ci/run sets up as the README says and then runs exactly the README's test command."""
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.strip().startswith("#")]
    setup, test = (b for b in blocks(README) if "ci" in b.words)
    assert test.code.strip() == "python -m pytest" == ci_lines[-1]
    parts = [part.strip() for part in setup.code.strip().split(" && ")]
    assert parts[:4] == ["python3 -m venv .venv", ". .venv/bin/activate", "pip install torch==2.13.0",
                         'pip install -e ".[test]"'], parts
    assert "python3 -m venv .venv" in ci_lines and ". .venv/bin/activate" in ci_lines
    assert any(line.endswith("pip install --quiet torch==2.13.0") for line in ci_lines)
    assert any(line.endswith('pip install --quiet -e ".[test]"') for line in ci_lines)
    assert all(part.startswith("python -m lightning_custom ") for part in parts[4:])  # the main job


@pytest.mark.parametrize("page", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files_and_headings(page):
    links = relative_links(page)
    for link, target, anchor in links:
        assert target.exists(), f"{page.name}: {link} -> {target} does not exist"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{page.name}: {link}: no heading #{anchor} in {target.name}"
    if page == README:
        linked = {target for _, target, _ in links}
        assert {p.resolve() for p in DOC_FILES[1:]} <= linked, "a docs page the README does not link"


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    return [p for choice in match.group(1).split(",")
            for p in _expand_braces(pattern[:match.start()] + choice + pattern[match.end():])]


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                target = getattr(target, name)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("page", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_paths_and_python_names_the_pages_name_exist(page):
    """Every repository path (``configs/...``, ``lightning_custom/...``, ``benchmarks/results/...``; globs and
    ``{a,b}`` allowed) and every ``lightning_custom.x.Y`` name a page writes in backticks exists, so a moved file
    or class shows up here."""
    text = page.read_text()
    spans = [span.replace("\n", "") for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.DOTALL))]
    for span in spans:
        if re.fullmatch(r"(lightning_custom|benchmarks|scripts|examples|configs|tests|checkpoints|docs)/[\w/.*{},-]*",
                        span):
            assert all(list(ROOT.glob(p.rstrip("/"))) for p in _expand_braces(span)), f"{page.name}: no {span}"
        elif name := re.match(r"(lightning_custom(?:\.\w+)+)(?:\(|$)", span):
            assert _resolves(name.group(1)), f"{page.name}: {span} does not import"


# ------------------------------------------------------------------------------------ the blocks, run as written
def run_block(code: str, language: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run a block in ``cwd`` as a reader would in the repository root, with ``python`` this interpreter; the
    repository's folders are linked in, so what the block writes (``runs/...``) lands in ``cwd``."""
    for name in ("configs", "benchmarks", "scripts", "examples"):
        (cwd / name).symlink_to(ROOT / name)
    bin_dir = cwd / ".bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                               os.environ.get("PYTHONPATH")]))}
    if language == "bash":
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        (cwd / "block.py").write_text(code)
        command = [sys.executable, "block.py"]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800,
                            check=False)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in ALL_BLOCKS if b.runs_here], ids=lambda b: b.id)
def test_the_block_runs_as_written(block: Block, tmp_path):
    run_block(block.code, block.language, tmp_path)


@pytest.mark.slow
def test_the_readme_main_job_runs_as_written_after_the_set_up(tmp_path):
    """The README's first command without its set-up (the environment these tests run in): the main job."""
    setup = next(b for b in blocks(README) if "ci" in b.words and "lightning_custom" in b.code)
    job = " && ".join(part for part in setup.code.strip().split(" && ") if part.startswith("python -m lightning_"))
    result = run_block(job, "bash", tmp_path)
    summary = json.loads((tmp_path / "runs" / "quickstart" / "summary.json").read_text())
    assert summary["stopped_by"] == "dvar" and summary["stop_step"] < summary["max_steps"]
    assert "identity similarity to the concept images: before" in result.stdout
    assert (tmp_path / "runs" / "quickstart" / "before_after.png").is_file()
