"""This host's mapping records and the per-image lock (block_rbd/state.py)."""

import multiprocessing
import os
import subprocess
import threading
import time

import pytest

from block_rbd.errors import LockTimeout
from block_rbd.state import LocalState, new_record
from block_rbd.target import ImageSpec

SPEC = ImageSpec("rbd", "vm1")


@pytest.fixture
def state(tmp_path):
    return LocalState(str(tmp_path / "state"), lock_timeout=0.5)


def test_records_round_trip_per_mode(state):
    assert state.load(SPEC, False) is None
    record = new_record(SPEC, False)
    assert record == {"image": "rbd/vm1", "read_only": False, "mapper": None, "device": None, "holders": {}}
    record["holders"]["backend/vbd/5/51712"] = {"mode": "w"}
    state.save(SPEC, False, record)
    assert state.load(SPEC, False) == record
    assert state.load(SPEC, True) is None  # read-only and read-write mappings are separate
    state.save(SPEC, True, new_record(SPEC, True))
    assert [r["read_only"] for r in state.records()] == [True, False] or len(state.records()) == 2
    state.delete(SPEC, False)
    state.delete(SPEC, False)  # idempotent
    assert state.load(SPEC, False) is None
    assert len(state.records()) == 1


def test_files_are_private(state):
    state.save(SPEC, False, new_record(SPEC, False))
    assert os.stat(state.maps_dir).st_mode & 0o777 == 0o700
    with state.lock(SPEC):
        pass
    assert os.stat(state.locks_dir).st_mode & 0o777 == 0o700
    for name in os.listdir(state.locks_dir):
        assert os.stat(os.path.join(state.locks_dir, name)).st_mode & 0o077 == 0


def test_distinct_specs_have_distinct_files(state):
    specs = [ImageSpec("rbd", "vm1"), ImageSpec("rbd", "vm1", "ns"), ImageSpec("rbd", "vm1", "", "s"),
             ImageSpec("rbd2", "vm1"), ImageSpec("rbd", "ns%2Fvm1")]
    for spec in specs:
        state.save(spec, False, new_record(spec, False))
    assert sorted(r["image"] for r in state.records()) == sorted(str(s) for s in specs)


def test_records_ignore_junk_and_half_written_files(state):
    state.save(SPEC, False, new_record(SPEC, False))
    with open(os.path.join(state.maps_dir, "broken.json"), "w") as handle:
        handle.write("{not json")
    with open(os.path.join(state.maps_dir, "x.json.123.tmp"), "w") as handle:
        handle.write("{}")
    assert [r["image"] for r in state.records()] == ["rbd/vm1"]


def test_no_records_without_a_directory(state):
    assert state.records() == []


def test_save_is_atomic(state):
    """A reader never sees half a record while writers keep replacing it."""
    stop = threading.Event()
    errors = []

    def writer():
        n = 0
        while not stop.is_set():
            record = new_record(SPEC, False)
            record["holders"] = {"h%d" % i: {"x" * 100: i} for i in range(50 + n % 7)}
            state.save(SPEC, False, record)
            n += 1

    thread = threading.Thread(target=writer)
    state.save(SPEC, False, new_record(SPEC, False))
    thread.start()
    try:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            try:
                assert state.load(SPEC, False)["image"] == "rbd/vm1"
            except Exception as exc:  # noqa: BLE001 -- any failure is the finding
                errors.append(exc)
    finally:
        stop.set()
        thread.join()
    assert errors == []


def _hold(state_dir, spec, ready, release):
    with LocalState(state_dir).lock(spec):
        ready.set()
        release.wait(10)


def test_lock_excludes_other_processes_and_times_out(state):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(os.path.dirname(state.maps_dir), SPEC, ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        started = time.monotonic()
        with pytest.raises(LockTimeout, match="another block-rbd run on this host has held rbd/vm1"):
            with state.lock(SPEC):
                pass
        assert 0.4 < time.monotonic() - started < 2
        # the lock is per image: another image is not held up
        with state.lock(ImageSpec("rbd", "vm2")):
            pass
        # all snapshots of an image share its lock
        with pytest.raises(LockTimeout):
            with state.lock(ImageSpec("rbd", "vm1", "", "snap")):
                pass
    finally:
        release.set()
        holder.join(10)
    with state.lock(SPEC):  # released when the holder exits
        pass


def test_lock_is_released_when_the_holder_is_killed(state):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(os.path.dirname(state.maps_dir), SPEC, ready, release))
    holder.start()
    assert ready.wait(10)
    holder.kill()
    holder.join(10)
    with state.lock(SPEC):
        pass


def test_lock_fd_is_not_inherited_by_children(state):
    with state.lock(SPEC):
        # a daemon started while the lock is held (rbd-fuse, rbd-nbd) must not keep it
        out = subprocess.run(["sh", "-c", "for f in /proc/$$/fd/*; do readlink $f; done"],
                             capture_output=True, text=True, close_fds=False).stdout
        assert state.locks_dir not in out


def test_threads_of_one_process_wait_for_each_other(state):
    order = []

    def second():
        with state.lock(SPEC):
            order.append("second")

    state.lock_timeout = 5
    with state.lock(SPEC):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.2)
        order.append("first")
    thread.join(5)
    assert order == ["first", "second"]
