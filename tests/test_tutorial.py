"""The tutorial (docs/tutorial, docs/zh/tutorial) runs as printed.

Every chapter's code blocks run in order in a fresh working directory, and what each block
prints must be what the chapter shows (see tests/markdown_blocks.py for the conventions).
The Chinese chapters hold the same code as the English ones (comments aside) and the same
outputs; the indexes list all ten chapters, and every relative link resolves.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import matplotlib
import pytest
import torch

from tests.markdown_blocks import blocks, run_chapter

ROOT = Path(__file__).resolve().parents[1]
EN = ROOT / "docs" / "tutorial"
ZH = ROOT / "docs" / "zh" / "tutorial"
CHAPTER = "[0-9][0-9]-*.md"
WRITTEN = 10
"""all ten chapters are written, every section of them: no `<!-- TODO(issue-N): ... -->` left"""


def chapters(folder: Path) -> list[Path]:
    return sorted(folder.glob(CHAPTER))


SLOW = {"06-training-a-language-model.md", "07-scaling-out.md", "08-hyper-parameters.md", "09-fine-tuning.md", "10-deploy.md"}
"""chapters that run `ling` commands, `torchrun` or dozens of small trainings (~15-50 s of CPU each)"""


@pytest.mark.parametrize("chapter", [pytest.param(p, marks=[pytest.mark.slow] if p.name in SLOW else [])
                                     for p in chapters(EN) + chapters(ZH)],
                         ids=lambda p: str(p.relative_to(ROOT / "docs")))
def test_chapter_runs_and_prints_what_it_shows(chapter, tmp_path, monkeypatch):
    """A learner runs the chapter from the repository root: the test runs it in an empty
    directory that sees the repository's configs/ as the learner does."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the `ling` commands the chapter runs
    matplotlib.use("Agg")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: on a busy machine two threads mostly wait for each other
    try:
        run_chapter(chapter)
    finally:
        torch.set_num_threads(threads)


def test_both_languages_have_the_same_chapters():
    assert [p.name for p in chapters(EN)] == [p.name for p in chapters(ZH)]
    assert len(chapters(EN)) == WRITTEN


def _code(block) -> str:
    """A block's code without comments and docstrings: what the translations must share."""
    if block.language != "python":
        return "\n".join(line.split(" #")[0].rstrip() for line in block.source.splitlines()
                         if line.strip() and not line.lstrip().startswith("#"))
    tree = ast.parse(block.source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body[0] = ast.Pass()
    return ast.unparse(tree)


@pytest.mark.parametrize("name", [p.name for p in chapters(EN)])
def test_chinese_chapter_has_the_english_code_and_outputs(name):
    english, chinese = blocks(EN / name), blocks(ZH / name)
    assert len(english) == len(chinese), f"{name}: {len(english)} blocks in English, {len(chinese)} in Chinese"
    for i, (en, zh) in enumerate(zip(english, chinese)):
        assert (en.language, _code(en)) == (zh.language, _code(zh)), f"{name}: block {i + 1} differs"
        assert en.expected == zh.expected, f"{name}: the output of block {i + 1} differs"
        assert en.replacements == zh.replacements, f"{name}: the test setting of block {i + 1} differs"


LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", chapters(EN) + chapters(ZH) + [EN / "README.md", ZH / "README.md"],
                         ids=lambda p: str(p.relative_to(ROOT / "docs")))
def test_relative_links_resolve(page):
    text = page.read_text(encoding="utf-8")
    targets = [m["target"] for m in LINK.finditer(text) if "://" not in m["target"]]
    missing = [t for t in targets if not (page.parent / t).exists()]
    assert not missing, f"{page.name}: broken links {missing}"


@pytest.mark.parametrize("folder", [EN, ZH], ids=["en", "zh"])
def test_chapters_link_back_and_forward_and_into_the_reference(folder):
    pages = chapters(folder)
    for i, page in enumerate(pages):
        text = page.read_text(encoding="utf-8")
        assert "(README.md)" in text, f"{page.name} does not link to the index"
        if i > 0:
            assert f"({pages[i - 1].name})" in text, f"{page.name} does not link back to {pages[i - 1].name}"
        if i + 1 < len(pages):
            assert f"({pages[i + 1].name})" in text, f"{page.name} does not link on to {pages[i + 1].name}"
        assert re.search(r"\]\((\.\./)+([a-z]+\.md|ling/)", text), f"{page.name} links into no reference doc or source"
        assert text.count("<details>") >= 2, f"{page.name}: fewer than two exercises with a collapsed solution"


@pytest.mark.parametrize("folder", [EN, ZH], ids=["en", "zh"])
def test_index_lists_all_ten_chapters_in_order(folder):
    index = (folder / "README.md").read_text(encoding="utf-8")
    items = [line for line in index.splitlines() if re.match(r"^\d+\. ", line)][:10]
    assert [line.split(".")[0] for line in items] == [str(n) for n in range(1, 11)]
    assert [re.search(r"\]\(([^)]+\.md)\)", line)[1] for line in items] == [p.name for p in chapters(folder)]


TODO = re.compile(r"<!-- TODO\(issue-(\d+)\)")


@pytest.mark.parametrize("chapter", chapters(EN) + chapters(ZH), ids=lambda p: str(p.relative_to(ROOT / "docs")))
def test_no_section_is_left_to_fill(chapter):
    assert TODO.findall(chapter.read_text(encoding="utf-8")) == [], f"{chapter.name}: a TODO(issue-N) section is left"


def test_readme_sends_learners_to_chapter_one():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    learn = readme.index("## Learn")
    assert learn < readme.index("## Commands")
    assert "docs/tutorial/01-" in readme[learn:readme.index("## Commands")]
