"""The fenced code blocks of README.md and docs/*.md, for the tests that run or check them.

A block's info string is its language (``bash`` or ``python``) and then, optionally, words that say why it cannot
run as written here; such a block is only parsed and checked (:data:`PARSE_ONLY`). ``test:FILE::NAME`` names a test
that runs the block itself (with the tiny models in place of real checkpoints). Every other block runs as written
in ``tests/test_docs.py``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The words that mark a block parse-only, and why it cannot run in the tests.
PARSE_ONLY = {
    "gpu": "needs a CUDA GPU",
    "download": "needs real checkpoints from the Hugging Face hub",
    "cluster": "needs SLURM",
    "long": "trains for minutes to hours, or rewrites the shipped model",
    "placeholder": "needs your own files (photos, a run to resume)",
    "ci": "sets up a virtual environment or runs the whole test suite: what .ci/run does",
}


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    words: list[str]
    code: str
    tests: list[str] = field(default_factory=list)  # "FILE::NAME" from test:FILE::NAME words

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def parse_only(self) -> list[str]:
        return [w for w in self.words if w in PARSE_ONLY]

    @property
    def runs_here(self) -> bool:
        """Runs as written in tests/test_docs.py: neither parse-only nor run by a named test."""
        return not self.parse_only and not self.tests


def blocks(path: Path | None = None) -> list[Block]:
    """Every fenced block of ``path`` (default: README.md and docs/*.md), in order."""
    found = []
    for file in [path] if path is not None else DOC_FILES:
        lines = file.read_text().splitlines()
        start = None
        for number, line in enumerate(lines, 1):
            if not line.startswith("```"):
                continue
            if start is None:
                start, info = number, line[3:].split()
            else:
                words = info[1:]
                tests = [w.split(":", 1)[1] for w in words if w.startswith("test:")]
                found.append(Block(file, start, info[0] if info else "", [w for w in words if not w.startswith(
                    "test:")], "\n".join(lines[start:number - 1]) + "\n", tests))
                start = None
        assert start is None, f"{file}:{start}: unclosed code block"
    return found


def block_with(path: Path, text: str, language: str = "python") -> Block:
    """The one block of ``path`` in ``language`` that contains ``text``."""
    found = [b for b in blocks(path) if b.language == language and text in b.code]
    assert len(found) == 1, f"{path}: {len(found)} {language} blocks contain {text!r}"
    return found[0]


def without_statements(code: str, *calls: str) -> str:
    """``code`` without its top-level statements whose source contains any of ``calls`` (say, a download or a
    sampling call that a test replaces), keeping every other line as written."""
    tree = ast.parse(code)
    lines = code.splitlines()
    drop = set()
    for node in tree.body:
        source = "\n".join(lines[node.lineno - 1:node.end_lineno])
        if any(call in source for call in calls):
            drop.update(range(node.lineno - 1, node.end_lineno))
    return "\n".join(line for i, line in enumerate(lines) if i not in drop) + "\n"


def commands(block: Block) -> list[list[str]]:
    """The ``python ...`` command lines of a shell block, as argument lists (from ``python`` on), with line
    continuations joined, comments, redirections and leading ``srun`` / variable assignments dropped, and shell
    variables replaced by ``1``."""
    import shlex

    text = re.sub(r"\$\{?\w+\}?", "1", block.code.replace("\\\n", " ")).replace("\n", "\n; ")
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments, current = [], []
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            segments.append(current)
            current = []
        else:
            current.append(token)
    segments.append(current)
    found = []
    for segment in segments:
        if "python" not in segment and "python3" not in segment:
            continue
        start = segment.index("python" if "python" in segment else "python3")
        args = segment[start:]
        for i, token in enumerate(args):
            if set(token) <= set("<>&"):  # a redirection: > file, 2>&1
                args = args[:i]
                break
        found.append(args)
    return found


def relative_links(path: Path) -> list[tuple[str, Path, str]]:
    """``(link, target file, anchor)`` for every relative markdown link or image of ``path``."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    found = []
    for link in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", link):
            continue  # http(s), mailto
        target, _, anchor = link.partition("#")
        found.append((link, (path.parent / target).resolve() if target else path, anchor))
    return found


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the headings of a markdown file."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    slugs = set()
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs
