"""hpc_common.owned_folders: the lock that dies with its owner, and taking over dead owners' folders."""
from __future__ import annotations

import os
import time

import pytest

from hpc_common.owned_folders import FolderLocked, OwnedFolder, take_over_dead_owners, try_lock, write_atomic


def _taken(root, min_age, own_dir=None):
    seen = []
    take_over_dead_owners(str(root), own_dir, min_age, seen.append, "test:")
    return sorted(os.path.basename(f) for f in seen)


def test_a_live_owner_is_left_alone_and_a_dead_one_taken(tmp_path):
    alive = OwnedFolder(str(tmp_path), "alive")
    alive.open()
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / "lock").touch()  # its owner's flock died with it
    assert _taken(tmp_path, min_age=60.0) == ["dead"]
    with pytest.raises(FolderLocked):
        OwnedFolder(str(tmp_path), "alive").open()
    alive.close()
    assert not (tmp_path / "alive").exists()


def test_a_folder_without_its_lock_waits_min_age(tmp_path):
    young = tmp_path / "starting"
    young.mkdir()
    assert _taken(tmp_path, min_age=30.0) == []
    old = time.time() - 31.0
    os.utime(young, (old, old))
    assert _taken(tmp_path, min_age=60.0) == []  # the journal's longer wait
    assert _taken(tmp_path, min_age=30.0) == ["starting"]  # the spool's


def test_own_folder_is_never_taken(tmp_path):
    (tmp_path / "me").mkdir()
    (tmp_path / "me" / "lock").touch()
    assert _taken(tmp_path, 0.0, own_dir=str(tmp_path / "me")) == []


def test_a_failed_take_over_releases_the_lock(tmp_path):
    (tmp_path / "dead").mkdir()
    (tmp_path / "dead" / "lock").touch()

    def fail(folder):
        raise OSError(5, "disk gone")

    take_over_dead_owners(str(tmp_path), None, 60.0, fail, "test:")
    fd = try_lock(str(tmp_path / "dead" / "lock"), create=False)
    assert fd is not None
    os.close(fd)


def test_write_atomic_leaves_no_temporary(tmp_path):
    target = tmp_path / "x.json"
    write_atomic(str(target), b"{}", tmp=str(target) + ".tmp")
    assert target.read_bytes() == b"{}" and os.listdir(tmp_path) == ["x.json"]
