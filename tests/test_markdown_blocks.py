"""The Markdown runner the tutorial's tests use: what passes and what fails."""

import pytest

from tests.markdown_blocks import SybilFailure, blocks, run_chapter

FENCE = "```"


def chapter(tmp_path, text: str):
    path = tmp_path / "chapter.md"
    path.write_text(text.replace("'''", FENCE), encoding="utf-8")
    return path


def test_blocks_share_state_in_order_and_their_output_is_checked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = chapter(tmp_path, """
'''python
x = 21
'''
Some prose.
'''python
print(x * 2)
'''
'''output
42
'''
'''bash
echo "$((6 * 7)) from bash" > answer.txt && cat answer.txt
'''
'''output
42 from ...
'''
'''text
a file tree, not code
'''
""")
    run_chapter(path)
    assert [b.language for b in blocks(path)] == ["python", "python", "bash"]


def test_a_wrong_output_fails_naming_the_line(tmp_path):
    path = chapter(tmp_path, "intro\n\n'''python\nprint(1 + 1)\n'''\n'''output\n3\n'''\n")
    with pytest.raises(SybilFailure, match="line 3"):
        run_chapter(path)


def test_printing_what_the_chapter_does_not_show_fails(tmp_path):
    with pytest.raises(SybilFailure, match="does not show"):
        run_chapter(chapter(tmp_path, "'''python\nprint('surprise')\n'''\n"))


def test_a_failing_command_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="bash exited with 3"):
        run_chapter(chapter(tmp_path, "'''bash\nexit 3\n'''\n"))


def test_a_directive_runs_the_tiny_setting_and_must_match_the_block(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_chapter(chapter(tmp_path, "<!-- tutorial-test\nreplace: 5000 => 5\n-->\n'''bash\necho steps 5000\n'''\n"
                                  "'''output\nsteps 5\n'''\n"))
    stale = chapter(tmp_path, "<!-- tutorial-test\nreplace: 9999 => 5\n-->\n'''bash\necho steps 5000\n'''\n")
    with pytest.raises(ValueError, match="does not occur"):
        run_chapter(stale)


def test_invisible_blocks_run_too(tmp_path):
    run_chapter(chapter(tmp_path, "<!-- invisible-code-block: python\nsecret = 7\n-->\n\n"
                                  "'''python\nprint(secret)\n'''\n'''output\n7\n'''\n"))


@pytest.mark.parametrize("text, message", [
    ("'''py\nprint(1)\n'''\n", "neither runnable"),
    ("'''output\n1\n'''\n", "must directly follow"),
    ("'''python\nprint(1)\n'''\n\nprose\n\n'''output\n1\n'''\n", "must directly follow"),
])
def test_unknown_fences_and_stray_outputs_are_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        blocks(chapter(tmp_path, text))
