"""Atomic outputs: all or nothing, with ordinary permissions."""

import os
import stat

import pytest

from ling.atomic import atomic_dir, atomic_file


def test_atomic_dir_appears_complete_with_umask_permissions(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("x")
        assert not target.exists()
    assert (target / "a.txt").read_text() == "x"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_overwrite_replaces_only_when_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, overwrite=True):
            raise RuntimeError("boom")
    assert (target / "old.txt").exists()
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in target.iterdir()] == ["new.txt"]


def test_atomic_file(tmp_path):
    target = tmp_path / "f.json"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with atomic_file(target) as f:
        f.write("{}")
    assert target.read_text() == "{}"
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_replacing_swaps_in_one_step_so_the_path_never_goes_missing(tmp_path, monkeypatch):
    from ling import atomic

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    swaps = []
    exchange = atomic._exchange
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: swaps.append((a, b)) or exchange(a, b))
    monkeypatch.setattr(atomic.os, "replace", lambda *a: pytest.fail("the old directory was moved away first"))
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [b for _, b in swaps] == [target] and [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_without_renameat2_the_old_directory_stays_until_the_new_one_is_in_place(tmp_path, monkeypatch):
    from ling import atomic

    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_killed_runs_temporaries_are_removed_at_the_next_write_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a PID that has exited
    stale = [tmp_path / f".out.tmp-{dead}-abc", tmp_path / ".out.tmp-k3j_x8"]  # the second: ling before PIDs
    for path in stale:
        path.mkdir()
        (path / "big.bin").write_bytes(b"x" * 1000)
    (tmp_path / f".out.tmp-{dead}-file").write_text("half a file")
    live = tmp_path / f".out.tmp-{os.getpid()}-live"  # e.g. another thread of this process, still writing
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead}-abc"  # another output's: not this one's to clean
    other.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, other.name])


def test_an_output_that_appears_meanwhile_is_left_alone(tmp_path):
    from ling.errors import LingError

    target = tmp_path / "out"
    with pytest.raises(LingError, match="appeared while this run was writing it"):
        with atomic_dir(target) as tmp:
            (tmp / "mine.txt").write_text("this run")
            target.mkdir()
            (target / "theirs.txt").write_text("another run")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("case", ["symlink", "file", "foreign", "empty", "ours"])
def test_check_output_dir_replaces_only_empty_dirs_and_ling_artifacts(tmp_path, case):
    from ling.atomic import check_output_dir
    from ling.errors import LingError

    target = tmp_path / "out"
    is_ours = lambda path: (path / "meta.json").exists()  # noqa: E731
    if case == "symlink":
        (tmp_path / "real").mkdir()
        target.symlink_to(tmp_path / "real")
    elif case == "file":
        target.write_text("x")
    else:
        target.mkdir()
        if case != "empty":
            (target / ("meta.json" if case == "ours" else "thesis.tex")).write_text("x")
    if case in ("empty", "ours"):
        assert check_output_dir(target, True, is_ours, "a dataset") == target
        return
    message = {"symlink": "is a symlink", "file": "exists and is not a directory",
               "foreign": "does not hold a dataset ling wrote, so --overwrite does not replace it"}[case]
    with pytest.raises(LingError, match=message):
        check_output_dir(target, True, is_ours, "a dataset")


def test_safetensors_files_get_the_usual_mode(tmp_path):
    from ling.checkpoint import save_model_dir
    from ling.config import ModelConfig
    from ling.hf.checkpoint import save_hf_dir
    from ling.model import build_model

    model = build_model(ModelConfig.from_name("tiny"))
    save_model_dir(model, None, tmp_path / "ling")
    save_hf_dir(model, None, tmp_path / "hf")
    mask = os.umask(0)
    os.umask(mask)
    expected = 0o666 & ~mask  # 0644 under the usual umask, as config.json gets
    for path in [tmp_path / "ling" / "model.safetensors", tmp_path / "hf" / "model.safetensors"]:
        config_mode = stat.S_IMODE((path.parent / "config.json").stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == expected == config_mode
    old = os.umask(0o027)  # a stricter umask is respected too
    try:
        save_model_dir(model, None, tmp_path / "strict")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "strict" / "model.safetensors").stat().st_mode) == 0o640
