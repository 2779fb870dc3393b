"""Run a tutorial chapter's code blocks in order and check what they print (with Sybil).

A chapter is Markdown. Sybil finds its blocks; this module says what each kind means:

- ```python blocks run in one namespace per chapter, top to bottom, so later blocks use
  what earlier ones defined. `<!-- invisible-code-block: python ... -->` is a block the
  page does not show (test-only setup, e.g. writing a tiny corpus).
- ```bash blocks run with `bash -euo pipefail` in the same working directory, with this
  interpreter's scripts directory first on PATH (so `ling` is the checkout's).
- An ```output block directly after a python or bash block is what that block prints to
  stdout, compared as doctest does with ELLIPSIS (`...` stands for any text). A block that
  prints something the page does not show fails too.
- `<!-- tutorial-test: ... -->` directly before a block changes what the test runs, one
  `replace: OLD => NEW` per line: the page shows the real command, the test runs a tiny
  setting. Each OLD must occur in the block, so a directive cannot go stale silently.
- ```text blocks are not code (file trees, diagrams); any other fence is an error, so that
  no code block goes untested by mistake.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sybil import Document, Example, Region, Sybil
from sybil.example import SybilFailure
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, FencedCodeBlockLexer

RUNNABLE = {"python", "bash"}
NOT_CODE = {"text"}
OUTPUT = "output"

_fences = FencedCodeBlockLexer(language=r"[\w+-]*")
_invisible = DirectiveInHTMLCommentLexer(directive="invisible-code-block", arguments="python")
_directives = DirectiveInHTMLCommentLexer(directive="tutorial-test")
_REPLACE = re.compile(r"^replace:\s*(?P<old>.+?)\s+=>\s+(?P<new>.+?)\s*$")


@dataclass
class Block:
    language: str
    source: str
    expected: str | None = None
    replacements: list[tuple[str, str]] = field(default_factory=list)

    def runnable_source(self) -> str:
        source = self.source
        for old, new in self.replacements:
            if old not in source:
                raise ValueError(f"tutorial-test directive: {old!r} does not occur in the block")
            source = source.replace(old, new)
        return source


def _lexed(document: Document) -> list[tuple[str, Region]]:
    """Every fence, invisible block and directive, in document order, tagged with its kind."""
    found = [(r.lexemes["language"], r) for r in _fences(document)]
    found += [("python-invisible", r) for r in _invisible(document)]
    found += [("directive", r) for r in _directives(document)]
    return sorted(found, key=lambda item: item[1].start)


def _adjacent(document: Document, end: int, start: int) -> bool:
    """Only white space (or the close of an HTML comment, which Sybil leaves out of its
    region) between the two."""
    return re.fullmatch(r"\s*(--+>)?\s*", document.text[end:start]) is not None


def parse_blocks(document: Document):
    """Sybil parser: one region per runnable block, spanning its output block if it has one."""
    regions: list[tuple[Region, Block]] = []
    pending: tuple[Region, list] | None = None  # a directive waiting for its block
    last: tuple[Region, Block] | None = None  # the last runnable block, for an output block
    for kind, region in _lexed(document):
        where = document.line_column(region.start)
        if kind == "directive":
            replacements = []
            for line in filter(str.strip, region.lexemes["source"].splitlines()):
                match = _REPLACE.match(line.strip())
                if not match:
                    raise ValueError(f"{document.path}, {where}: expected 'replace: OLD => NEW', got {line!r}")
                replacements.append((match["old"], match["new"]))
            pending = (region, replacements)
            continue
        if kind == OUTPUT:
            if last is None or not _adjacent(document, last[0].end, region.start) or last[1].expected is not None:
                raise ValueError(f"{document.path}, {where}: an output block must directly follow a code block")
            last[1].expected = region.lexemes["source"]
            last[0].end = region.end
            continue
        language = "python" if kind == "python-invisible" else kind
        if language in NOT_CODE:
            last = None
            continue
        if language not in RUNNABLE:
            raise ValueError(f"{document.path}, {where}: fence '{language}' is neither runnable "
                             f"({', '.join(sorted(RUNNABLE))}) nor '{OUTPUT}' / 'text'")
        block = Block(language, region.lexemes["source"])
        if pending is not None:
            if not _adjacent(document, pending[0].end, region.start):
                raise ValueError(f"{document.path}: the tutorial-test directive before {where} is not directly before it")
            block.replacements, pending = pending[1], None
        last = (Region(region.start, region.end, parsed=block, evaluator=evaluate), block)
        regions.append(last)
    if pending is not None:
        raise ValueError(f"{document.path}: a tutorial-test directive is followed by no code block")
    return [region for region, _ in regions]


def evaluate(example: Example) -> str | None:
    """Run one block; a returned string is Sybil's way of saying it failed, and why."""
    block: Block = example.parsed
    source = block.runnable_source()
    if block.language == "python":
        printed = _run_python(source, example)
    else:
        printed = _run_bash(source)
    return _compare(block.expected, printed)


def _run_python(source: str, example: Example) -> str:
    # Padded so that a traceback names the line of the Markdown file.
    code = compile("\n" * example.line + source, example.path, "exec", dont_inherit=True)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(code, example.namespace)
    example.namespace.pop("__builtins__", None)
    return buffer.getvalue()


def _run_bash(source: str) -> str:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", source], capture_output=True, text=True,
                          env=env, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"bash exited with {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
                             f"\n--- stderr\n{proc.stderr[-3000:]}")
    return proc.stdout


def _compare(expected: str | None, printed: str) -> str | None:
    if expected is None:
        if printed.strip():
            return f"the block printed output that the chapter does not show:\n{printed}"
        return None
    checker = doctest.OutputChecker()
    want = "\n".join(line.rstrip() for line in expected.strip("\n").splitlines()) + "\n"
    got = "\n".join(line.rstrip() for line in printed.strip("\n").splitlines()) + "\n"
    if checker.check_output(want, got, doctest.ELLIPSIS):
        return None
    return checker.output_difference(doctest.Example("", want), got, doctest.ELLIPSIS | doctest.REPORT_UDIFF)


TUTORIAL = Sybil(parsers=[parse_blocks], path=str(Path(__file__).resolve().parents[1] / "docs"))


def run_chapter(path: Path) -> None:
    """Evaluate every block of a chapter in order; the first failure raises, naming its line."""
    document = TUTORIAL.parse(path)
    for example in document.examples():
        example.evaluate()


def blocks(path: Path) -> list[Block]:
    """A chapter's blocks in order (what the English and Chinese chapters must share)."""
    return [example.parsed for example in TUTORIAL.parse(path).examples()]


__all__ = ["Block", "SybilFailure", "blocks", "run_chapter"]
