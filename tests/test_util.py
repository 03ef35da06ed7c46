"""util: atomic writes keep the old file on failure and get normal permissions."""

import os
import stat

import pytest

from samliver.util import SamliverError, atomic_path, atomic_write_text, cache_dir


def test_atomic_write_replaces_and_keeps_old_on_failure(tmp_path):
    p = atomic_write_text(tmp_path / "a.txt", "first")
    with pytest.raises(RuntimeError):
        with atomic_path(p) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert p.read_text() == "first"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]  # no temp file left behind


def test_atomic_write_mode_follows_umask(tmp_path):
    old = os.umask(0o022)
    try:
        p = atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644


def test_unwritable_cache(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        target = tmp_path / "file"  # root can write anywhere: use a path under a regular file
        target.write_text("")
        monkeypatch.setenv("SAMLIVER_HOME", str(target))
    else:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        monkeypatch.setenv("SAMLIVER_HOME", str(ro / "home"))
    with pytest.raises(SamliverError, match="SAMLIVER_HOME"):
        cache_dir("embeddings")


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path):
    from samliver.util import atomic_folder

    target = tmp_path / "export"
    with atomic_folder(target) as tmp:
        (tmp / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "a.txt").write_text("2")
            raise RuntimeError("crash mid-build")
    assert (target / "a.txt").read_text() == "1"  # the good export survives a failed build
    with atomic_folder(target) as tmp:
        (tmp / "b.txt").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]  # replaced whole
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary folder left


def test_atomic_folder_yields_to_a_concurrent_writer(tmp_path, monkeypatch):
    """Another process that puts its folder in place between our removal and our rename wins:
    no error, its folder stays whole, ours is cleaned up."""
    import os

    import samliver.util as util

    target = tmp_path / "export"
    real_replace = os.replace

    def racing_replace(src, dst):
        if str(dst) == str(target):
            target.mkdir()
            (target / "theirs.txt").write_text("other process")
        return real_replace(src, dst)

    monkeypatch.setattr(util.os, "replace", racing_replace)
    with util.atomic_folder(target) as tmp:
        (tmp / "ours.txt").write_text("this process")
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
