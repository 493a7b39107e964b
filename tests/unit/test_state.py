"""This host's mapping records, pending releases and the per-image lock (block_rbd/state.py)."""

import json
import multiprocessing
import os
import subprocess
import threading
import time

import pytest

from block_rbd import deadline
from block_rbd import state as state_mod
from block_rbd.errors import CorruptRecord, HotplugTimeout, LockTimeout, StateError
from block_rbd.mappers.base import Mapping
from block_rbd.state import RECORD_VERSION, Holder, LocalState, MapRecord, PendingRelease
from block_rbd.target import ImageSpec

SPEC = ImageSpec("rbd", "vm1")
VM = "11111111-1111-1111-1111-111111111111"
BACKEND = "backend/vbd/5/51712"


@pytest.fixture
def state(tmp_path):
    return LocalState(str(tmp_path / "state"), lock_timeout=0.5)


def record_of(spec, read_only, **holders):
    record = MapRecord(str(spec), read_only)
    for name, holder in holders.items():
        record.hold(name, holder)
    return record


def test_records_round_trip_per_mode(state):
    assert state.load(SPEC, False) is None
    record = MapRecord("rbd/vm1", False)
    assert record == MapRecord(image="rbd/vm1", read_only=False, mapper=None, device=None, holders={})
    assert record.spec == SPEC
    record.hold(BACKEND, Holder(mode="w", since=1700000000, vm=VM, domid="5", devid="51712"))
    record.hold("manual", Holder(mode="w", since=1700000001))
    record.mapped_by(Mapping("nbd", SPEC, False, "/dev/nbd0", {"cookie": "c00k1e", "options": ["notrim"]}))
    state.save(record)
    loaded = state.load(SPEC, False)
    assert loaded == record
    assert loaded.holders[BACKEND] == Holder(mode="w", since=1700000000, vm=VM, domid="5", devid="51712")
    assert (loaded.mapper, loaded.device, loaded.cookie, loaded.options) == ("nbd", "/dev/nbd0", "c00k1e", ["notrim"])
    assert state.load(SPEC, True) is None  # read-only and read-write mappings are separate
    state.save(MapRecord("rbd/vm1", True))
    assert sorted(r.read_only for r in state.records()) == [False, True]
    state.delete(SPEC, False)
    state.delete(SPEC, False)  # idempotent
    assert state.load(SPEC, False) is None
    assert [r.read_only for r in state.records()] == [True]


def test_a_record_of_a_snapshot_round_trips(state):
    snap = ImageSpec("rbd", "vm1", "tenant", "gold")
    state.save(record_of(snap, True, manual=Holder(mode="r", since=1)))
    assert state.load(snap, True).spec == snap
    assert state.load(snap.head(), True) is None  # the head is another mapping


def test_hold_and_drop():
    record = MapRecord("rbd/vm1", False)
    record.hold(BACKEND, Holder(mode="w", since=1))
    record.hold(BACKEND, Holder(mode="w", since=2))  # the same holder again: replaced, not doubled
    assert list(record.holders) == [BACKEND] and record.holders[BACKEND].since == 2
    assert record.drop(BACKEND) is True
    assert record.drop(BACKEND) is False
    assert record.holders == {}


def test_saved_records_carry_their_version(state):
    state.save(record_of(SPEC, False, manual=Holder(mode="w", since=1)))
    with open(state._path(SPEC, False)) as handle:
        data = json.load(handle)
    assert data["version"] == RECORD_VERSION == 3
    assert (data["cookie"], data["options"]) == (None, [])
    assert data["holders"] == {"manual": {"mode": "w", "since": 1, "vm": None, "domid": None, "devid": None}}


def _write_raw(state, spec, read_only, data):
    os.makedirs(state.maps_dir, mode=0o700, exist_ok=True)
    with open(state._path(spec, read_only), "w") as handle:
        json.dump(data, handle)


def test_a_version_1_record_is_read_and_migrated(state):
    """The dict the first release wrote: no version, each holder the whole request."""
    _write_raw(state, SPEC, False, {
        "image": "rbd/vm1", "read_only": False, "mapper": "krbd", "device": "/dev/rbd0",
        "holders": {
            BACKEND: {"host": "h1", "vm": VM, "domid": "5", "devid": "51712", "backend": BACKEND,
                      "mode": "w", "since": 1700000000},
            "manual": {"host": "h1", "vm": None, "domid": None, "devid": None, "backend": None,
                       "mode": "w!", "since": 1700000100},
        }})
    record = state.load(SPEC, False)
    assert record == MapRecord("rbd/vm1", False, "krbd", "/dev/rbd0", {
        BACKEND: Holder(mode="w", since=1700000000, vm=VM, domid="5", devid="51712"),
        "manual": Holder(mode="w!", since=1700000100),
    })
    assert [r.image for r in state.records()] == ["rbd/vm1"]
    assert state.holders_of_image(SPEC) == {BACKEND, "manual"}
    # saved again, it is a current record
    state.save(record)
    with open(state._path(SPEC, False)) as handle:
        assert json.load(handle)["version"] == RECORD_VERSION
    assert state.load(SPEC, False) == record


def test_a_version_2_record_has_no_cookie(state):
    """An nbd mapping made before cookies (ioctl): read as one upkeep cannot reattach."""
    _write_raw(state, SPEC, False, {"version": 2, "image": "rbd/vm1", "read_only": False, "mapper": "nbd",
                                    "device": "/dev/nbd3", "holders": {"manual": {"mode": "w", "since": 1}}})
    record = state.load(SPEC, False)
    assert (record.mapper, record.device, record.cookie, record.options) == ("nbd", "/dev/nbd3", None, [])


def test_a_version_1_record_with_numbers_for_ids(state):
    _write_raw(state, SPEC, True, {
        "image": "rbd/vm1", "read_only": True, "mapper": None, "device": None,
        "holders": {BACKEND: {"host": "h1", "vm": VM, "domid": 5, "devid": 51712, "backend": BACKEND,
                              "mode": "r", "since": 1700000000}}})
    holder = state.load(SPEC, True).holders[BACKEND]
    assert (holder.domid, holder.devid) == ("5", "51712")


def test_a_newer_record_is_refused_not_misread(state):
    _write_raw(state, SPEC, False, {"version": RECORD_VERSION + 1, "image": "rbd/vm1", "read_only": False,
                                    "holders": {BACKEND: {"mode": "w", "since": 1, "lease": "x"}}})
    with pytest.raises(StateError) as info:
        state.load(SPEC, False)
    message = str(info.value)
    assert "newer block-rbd" in message and "version 4" in message and "\n" not in message
    assert state._path(SPEC, False) in message
    # a listing leaves that one record out (and says so); what needs every holder refuses
    state.save(MapRecord("rbd/vm2", False))
    assert [r.image for r in state.records()] == ["rbd/vm2"]
    with pytest.raises(StateError):
        state.records(strict=True)
    with pytest.raises(StateError):
        state.holders_of_image(SPEC)


def test_files_are_private(state):
    state.save(MapRecord("rbd/vm1", False))
    assert os.stat(state.maps_dir).st_mode & 0o777 == 0o700
    with state.lock(SPEC):
        pass
    assert os.stat(state.locks_dir).st_mode & 0o777 == 0o700
    for name in os.listdir(state.locks_dir):
        assert os.stat(os.path.join(state.locks_dir, name)).st_mode & 0o077 == 0
    state.pend_release(SPEC, BACKEND)
    assert os.stat(state.pending_dir).st_mode & 0o777 == 0o700


def test_distinct_specs_have_distinct_files(state):
    specs = [ImageSpec("rbd", "vm1"), ImageSpec("rbd", "vm1", "ns"), ImageSpec("rbd", "vm1", "", "s"),
             ImageSpec("rbd2", "vm1"), ImageSpec("rbd", "ns%2Fvm1")]
    for spec in specs:
        state.save(MapRecord(str(spec), False))
    assert sorted(r.image for r in state.records()) == sorted(str(s) for s in specs)
    for spec in specs:
        assert state.load(spec, False).spec == spec


def test_records_ignore_junk_and_half_written_files(state):
    state.save(MapRecord("rbd/vm1", False))
    with open(os.path.join(state.maps_dir, "broken.json"), "w") as handle:
        handle.write("{not json")
    with open(os.path.join(state.maps_dir, "x.json.123.tmp"), "w") as handle:
        handle.write("{}")
    assert [r.image for r in state.records()] == ["rbd/vm1"]


def test_no_records_without_a_directory(state):
    assert state.records() == []
    assert state.pending() == []
    assert state.holders_of_image(SPEC) == set()


def test_save_is_atomic(state):
    """A reader never sees half a record while writers keep replacing it."""
    stop = threading.Event()
    errors = []

    def writer():
        n = 0
        while not stop.is_set():
            record = MapRecord("rbd/vm1", False)
            for i in range(50 + n % 7):
                record.hold("backend/vbd/%d/%s" % (i, "x" * 100), Holder(mode="r", since=i, vm=VM))
            state.save(record)
            n += 1

    thread = threading.Thread(target=writer)
    state.save(MapRecord("rbd/vm1", False))
    thread.start()
    try:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            try:
                assert state.load(SPEC, False).image == "rbd/vm1"
            except Exception as exc:  # noqa: BLE001 -- any failure is the finding
                errors.append(exc)
    finally:
        stop.set()
        thread.join()
    assert errors == []


# ---- holders of an image ----------------------------------------------------------------------

def test_holders_of_image_cover_every_snapshot_and_both_modes(state):
    state.save(record_of(SPEC, False, **{BACKEND: Holder(mode="w", since=1)}))
    state.save(record_of(SPEC, True, manual=Holder(mode="r", since=2)))
    state.save(record_of(ImageSpec("rbd", "vm1", "", "gold"), True,
                         **{"backend/vbd/7/51728": Holder(mode="r", since=3)}))
    # other images: another name, another namespace, another pool
    state.save(record_of(ImageSpec("rbd", "vm2"), False, **{"backend/vbd/8/1": Holder(mode="w", since=4)}))
    state.save(record_of(ImageSpec("rbd", "vm1", "ns"), False, **{"backend/vbd/9/1": Holder(mode="w", since=5)}))
    state.save(record_of(ImageSpec("tank", "vm1"), False, **{"backend/vbd/10/1": Holder(mode="w", since=6)}))
    expected = {BACKEND, "manual", "backend/vbd/7/51728"}
    assert state.holders_of_image(SPEC) == expected
    assert state.holders_of_image(ImageSpec("rbd", "vm1", "", "gold")) == expected  # asked by a snapshot
    assert state.holders_of_image(ImageSpec("rbd", "vm1", "ns")) == {"backend/vbd/9/1"}


# ---- pending cluster-wide releases --------------------------------------------------------------

def test_pending_releases_round_trip(state, mocker):
    clock = mocker.patch.object(state_mod, "time").time
    clock.side_effect = [1000.0, 999.0, 1001.0]
    state.pend_release(SPEC, BACKEND, reason="cluster down")
    state.pend_release(ImageSpec("rbd", "vm1", "", "gold"), "manual")  # a snapshot's is the image's
    state.pend_release(ImageSpec("tank", "db"), "backend/vbd/7/51728", reason="run killed")
    assert clock.call_count == 3
    assert state.pending() == [  # oldest first
        PendingRelease("rbd/vm1", "manual", 999.0, ""),
        PendingRelease("rbd/vm1", BACKEND, 1000.0, "cluster down"),
        PendingRelease("tank/db", "backend/vbd/7/51728", 1001.0, "run killed"),
    ]
    assert state.pending()[0].spec == SPEC
    state.release_done(SPEC, BACKEND)
    state.release_done(SPEC, BACKEND)  # idempotent
    state.release_done(ImageSpec("rbd", "vm1", "", "gold"), "manual")
    assert [(p.image, p.holder) for p in state.pending()] == [("tank/db", "backend/vbd/7/51728")]
    state.release_done(ImageSpec("tank", "db"), "backend/vbd/7/51728")
    assert state.pending() == []
    state.release_done(ImageSpec("tank", "db"), "never-pended")  # nothing to do: no error


def test_pending_release_again_replaces_it(state):
    state.pend_release(SPEC, BACKEND, reason="first")
    state.pend_release(SPEC, BACKEND, reason="second")
    assert [(p.holder, p.reason) for p in state.pending()] == [(BACKEND, "second")]


def test_pending_releases_of_distinct_holders_and_images_are_distinct(state):
    holders = [BACKEND, "backend/vbd/5/51713", "manual", "backend%2Fvbd%2F5%2F51712"]
    for holder in holders:
        state.pend_release(SPEC, holder)
    state.pend_release(ImageSpec("rbd", "vm1", "ns"), BACKEND)
    assert sorted((p.image, p.holder) for p in state.pending()) == sorted(
        [("rbd/vm1", h) for h in holders] + [("rbd/ns/vm1", BACKEND)])


def test_pending_ignores_junk_and_leaves_newer_alone(state):
    state.pend_release(SPEC, BACKEND)
    with open(os.path.join(state.pending_dir, "broken.json"), "w") as handle:
        handle.write("{")
    assert [p.holder for p in state.pending()] == [BACKEND]
    with open(os.path.join(state.pending_dir, "new.json"), "w") as handle:
        json.dump({"version": RECORD_VERSION + 1, "image": "rbd/vm1", "holder": "x", "since": 1}, handle)
    assert [p.holder for p in state.pending()] == [BACKEND]  # not acted upon, not misread
    assert os.path.exists(os.path.join(state.pending_dir, "new.json"))


# ---- the lock ---------------------------------------------------------------------------------

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


def _held(state):
    """A lock on SPEC held by another process until the returned stop() is called."""
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(os.path.dirname(state.maps_dir), SPEC, ready, release))
    holder.start()
    assert ready.wait(10)

    def stop():
        release.set()
        holder.join(10)
    return stop


def _wait_for_lock(state, spec=SPEC):
    started = time.monotonic()
    with pytest.raises(LockTimeout, match="another block-rbd run on this host has held rbd/vm1"):
        with state.lock(spec):
            pass
    return time.monotonic() - started


def test_within_a_budget_the_lock_wait_is_bounded_by_the_budget(state):
    stop = _held(state)
    try:
        # a budget shorter than lock_timeout ends the wait early ...
        state.lock_timeout = 10
        with deadline.budget(deadline.Deadline(0.6)):
            assert 0.5 < _wait_for_lock(state) < 2
        # ... and a longer one lets it wait past lock_timeout: the run still has the time
        state.lock_timeout = 0.3
        with deadline.budget(deadline.Deadline(1.5)):
            assert 1.3 < _wait_for_lock(state) < 3
        # outside any budget: lock_timeout
        assert 0.2 < _wait_for_lock(state) < 1.2
    finally:
        stop()


def test_with_the_budget_used_up_the_lock_is_not_even_tried(state):
    with deadline.budget(deadline.Deadline(0.0)):
        with pytest.raises(HotplugTimeout, match="used up before the local lock of rbd/vm1"):
            with state.lock(SPEC):
                pass
    with state.lock(SPEC):  # nothing was left held
        pass


def test_within_a_budget_a_free_lock_is_taken_at_once(state):
    with deadline.budget(deadline.Deadline(5)):
        started = time.monotonic()
        with state.lock(SPEC):
            assert time.monotonic() - started < 0.5


def test_slots_let_count_holders_in_at_once_and_the_next_waits(state):
    state.lock_timeout = 0.3
    with state.slot("nbd-map", 2), state.slot("nbd-map", 2):
        started = time.monotonic()
        with pytest.raises(LockTimeout, match="all 2 nbd-map slots of this host stayed busy"):
            with state.slot("nbd-map", 2):
                pass
        assert 0.2 < time.monotonic() - started < 1.2
        with state.slot("other", 1):  # another kind has slots of its own
            pass
    with state.slot("nbd-map", 2):  # both free again
        pass


def test_a_waiting_slot_is_taken_when_one_frees_within_the_budget(state):
    order = []
    entered = threading.Event()

    def first():
        with state.slot("nbd-map", 1):
            entered.set()
            time.sleep(0.4)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    assert entered.wait(5)
    with deadline.budget(deadline.Deadline(5)):
        with state.slot("nbd-map", 1):
            order.append("second in")
    t.join()
    assert order == ["first done", "second in"]


def test_slots_are_per_host_not_per_process(state):
    """Slots bind runs of other processes (the in-process hotplug path) as well."""
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()

    def hold():
        with LocalState(os.path.dirname(state.maps_dir)).slot("nbd-map", 1):
            ready.set()
            release.wait(10)

    holder = ctx.Process(target=hold)
    holder.start()
    try:
        assert ready.wait(10)
        with deadline.budget(deadline.Deadline(0.3)):
            with pytest.raises((LockTimeout, HotplugTimeout)):
                with state.slot("nbd-map", 1):
                    pass
    finally:
        release.set()
        holder.join(10)
    with state.slot("nbd-map", 1):
        pass


def test_request_timeouts_are_kept_per_device_and_what_is_not_one_is_left_out(state, tmp_path):
    state.set_request_timeout("/dev/nbd0", "brbd-x", "rbd/vm1", 12.5, "heal")
    state.set_request_timeout("/dev/nbd0", "brbd-x", "rbd/vm1", 40.0, "restart")  # one per device: replaced
    with open(os.path.join(state.timeouts_dir, "nbd1.json"), "w") as handle:
        json.dump({"device": "/dev/nbd1"}, handle)  # not one of ours (half, or a later layout)
    assert state.request_timeouts() == [
        {"device": "/dev/nbd0", "cookie": "brbd-x", "image": "rbd/vm1", "until": 40.0, "after": "restart"}]
    assert state.request_timeout("/dev/nbd1") is None and state.request_timeout("/dev/nbd2") is None
    state.drop_request_timeout("/dev/nbd0")
    state.drop_request_timeout("/dev/nbd0")  # already gone: nothing to do
    assert state.request_timeouts() == []


# ---- the ledger: what must outlive a reboot or a power loss -----------------------------------

@pytest.fixture
def ledger(tmp_path):
    return LocalState(str(tmp_path / "run"), lock_timeout=0.5, ledger_dir=str(tmp_path / "lib"))


def _earlier_boot(monkeypatch, boot):
    monkeypatch.setattr(state_mod, "boot_id", lambda: boot)


def test_pending_releases_and_notes_live_in_the_ledger_the_rest_under_state_dir(ledger, tmp_path):
    ledger.note_registered(SPEC, BACKEND)
    ledger.pend_release(SPEC, "manual")
    ledger.save(MapRecord("rbd/vm1", False))
    assert sorted(os.listdir(tmp_path / "lib")) == ["pending", "registered"]
    assert sorted(os.listdir(tmp_path / "run")) == ["maps"]
    assert os.stat(ledger.registered_dir).st_mode & 0o777 == 0o700


def test_a_registration_of_this_boot_is_not_pending(ledger):
    ledger.note_registered(SPEC, BACKEND)
    assert ledger.pending() == [] and not ledger.is_pending(SPEC, BACKEND)


def test_after_a_power_loss_the_earlier_boots_registrations_are_pending(ledger, monkeypatch):
    _earlier_boot(monkeypatch, "boot-1")
    ledger.note_registered(SPEC, BACKEND)
    ledger.note_registered(ImageSpec("rbd", "vm2"), "manual")
    _earlier_boot(monkeypatch, "boot-2")
    items = ledger.pending()
    assert [(p.image, p.holder) for p in items] == [("rbd/vm1", BACKEND), ("rbd/vm2", "manual")]
    assert items[0].reason == "registered in an earlier boot of this host, never released (power loss?)"
    assert ledger.is_pending(SPEC, BACKEND)
    ledger.release_done(SPEC, BACKEND)  # released in Ceph: the note goes
    assert [(p.image, p.holder) for p in ledger.pending()] == [("rbd/vm2", "manual")]
    assert not ledger.is_pending(SPEC, BACKEND)


def test_a_new_registration_of_the_key_makes_an_older_release_moot_but_keeps_its_note(ledger, monkeypatch):
    ledger.pend_release(SPEC, BACKEND)
    ledger.note_registered(SPEC, BACKEND)
    ledger.pending_moot(SPEC, BACKEND)
    assert ledger.pending() == []
    _earlier_boot(monkeypatch, "later")
    assert [p.holder for p in ledger.pending()] == [BACKEND]  # the new one, should this boot end unreleased


def test_a_release_that_was_pending_already_is_listed_once(ledger, monkeypatch):
    _earlier_boot(monkeypatch, "boot-1")
    ledger.note_registered(SPEC, BACKEND)
    ledger.pend_release(SPEC, BACKEND, "cluster down")
    _earlier_boot(monkeypatch, "boot-2")
    assert [(p.holder, p.reason) for p in ledger.pending()] == [(BACKEND, "cluster down")]


def test_pending_releases_an_older_block_rbd_kept_under_state_dir_are_finished_too(ledger, tmp_path):
    old = LocalState(str(tmp_path / "run"))  # 0.1: pending under state_dir
    old.pend_release(SPEC, BACKEND)
    assert [p.holder for p in ledger.pending()] == [BACKEND] and ledger.is_pending(SPEC, BACKEND)
    ledger.release_done(SPEC, BACKEND)
    assert ledger.pending() == [] and old.pending() == []


def test_a_corrupt_note_is_named_and_left_out(ledger):
    os.makedirs(ledger.registered_dir)
    with open(os.path.join(ledger.registered_dir, "junk.json"), "w") as handle:
        json.dump({"image": "rbd/vm1"}, handle)
    with open(os.path.join(ledger.registered_dir, "rbd.vm1.x.json"), "w") as handle:
        handle.write("{")
    assert ledger.pending() == []
    assert sorted(str(bad) for bad in ledger.corrupt_ledger()) == [
        "%s/junk.json: unreadable (no field 'holder')" % ledger.registered_dir,
        "%s/rbd.vm1.x.json: unreadable (not JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1))" % ledger.registered_dir]


def test_the_boot_id_is_the_kernels(tmp_path):
    path = tmp_path / "boot_id"
    path.write_text("0f8f7e6d-aaaa-bbbb-cccc-111122223333\n")
    assert state_mod.boot_id.__wrapped__(str(path)) == "0f8f7e6d-aaaa-bbbb-cccc-111122223333"
    assert state_mod.boot_id.__wrapped__(str(tmp_path / "none")) == ""


# ---- attacks: a corrupt record, an untrusted directory, a planted link ----------------

def _spoil(path, text):
    with open(path, "w") as handle:
        handle.write(text)


@pytest.mark.parametrize("text, problem", [
    ('{"image": "rbd/vm1", "read_o', "not JSON: Unterminated string starting at: line 1 column 22 (char 21)"),
    ("", "not JSON: Expecting value: line 1 column 1 (char 0)"),
    ('{"image": "rbd/vm1", "holders": {}}', "no field 'read_only'"),
    ('{"read_only": false}', "no field 'image'"),
    ('{"image": "rbd/vm1", "read_only": "yes"}', "field 'read_only' is 'yes'"),
    ('{"image": 7, "read_only": false}', "field 'image' is 7"),
    ('{"image": "rbd/-x", "read_only": false}',
     "image 'rbd/-x': image name '-x' starts with '-', which is not allowed"),
    ('{"image": "rbd/vm1", "read_only": false, "holders": []}', "field 'holders' is []"),
    ('{"image": "rbd/vm1", "read_only": false, "holders": {"manual": {"since": 1}}}', "no field 'mode'"),
    ('{"image": "rbd/vm1", "read_only": false, "holders": {"manual": {"mode": "rw"}}}',
     "holder 'manual' has mode 'rw'"),
    ('{"image": "rbd/vm1", "read_only": false, "holders": {"m": {"mode": "w", "since": Infinity}}}',
     "field 'since' is inf"),
    ('{"image": "rbd/vm1", "read_only": false, "mapper": "floppy"}', "mapper 'floppy'"),
    ('[1, 2]', "not a JSON object"),
    ('{"version": "3", "image": "rbd/vm1", "read_only": false}', "version '3'"),
    ("not UTF-8", None),
])
def test_a_corrupt_record_is_named_with_what_is_wrong(state, text, problem):
    state.save(MapRecord("rbd/vm1", False))
    path = state._path(SPEC, False)
    if problem is None:  # not UTF-8
        with open(path, "wb") as handle:
            handle.write(b'{"image": "rbd/vm1", "read_only": false, "x": "caf\xe9"}')
        problem = "not UTF-8 text"
    else:
        _spoil(path, text)
    with pytest.raises(CorruptRecord) as info:
        state.load(SPEC, False)
    assert str(info.value) == "%s: unreadable (%s)" % (path, problem)
    assert (info.value.path, info.value.problem) == (path, problem)
    assert state.records() == []  # left out of listings ...
    assert [str(bad) for bad in state.corrupt_records()] == [str(info.value)]  # ... but named
    with pytest.raises(CorruptRecord):
        state.holders_of_image(SPEC)  # what needs every holder of the image refuses
    assert state.holders_of_image(ImageSpec("rbd", "vm2")) == set()  # another image goes on


def test_a_corrupt_record_is_set_aside_and_a_new_one_can_be_written(state):
    state.save(MapRecord("rbd/vm1", False))
    path = state._path(SPEC, False)
    _spoil(path, "{")
    assert state.set_aside(SPEC, False) == path + ".corrupt"
    assert not os.path.exists(path) and open(path + ".corrupt").read() == "{"
    assert state.corrupt_records() == [] and state.set_aside_files() == [path + ".corrupt"]
    state.save(MapRecord("rbd/vm1", False))
    assert state.load(SPEC, False) == MapRecord("rbd/vm1", False)


def test_a_record_rewritten_meanwhile_is_not_set_aside(state):
    state.save(MapRecord("rbd/vm1", False))  # good again by the time set_aside looks
    assert state.set_aside(SPEC, False) is None
    assert state.load(SPEC, False) == MapRecord("rbd/vm1", False) and state.set_aside_files() == []


@pytest.mark.parametrize("data, problem", [
    ({"image": "rbd/vm1", "since": 1}, "no field 'holder'"),
    ({"image": "rbd/vm1", "holder": "manual"}, "no field 'since'"),
    ({"image": 3, "holder": "manual", "since": 1}, "field 'image' is 3"),
    ({"image": "rbd/vm1", "holder": "", "since": 1}, "empty holder"),
    ({"image": "rbd/vm1", "holder": "manual", "since": "yesterday"}, "field 'since' is 'yesterday'"),
    (["rbd/vm1"], "not a JSON object"),
])
def test_a_corrupt_pending_release_is_named_and_set_aside_never_crashing(ledger, data, problem):
    ledger.pend_release(SPEC, "manual")
    path = ledger._pending_path(SPEC, BACKEND)
    with open(path, "w") as handle:
        json.dump(data, handle)
    assert [p.holder for p in ledger.pending()] == ["manual"]  # the good one is still done
    (bad,) = ledger.corrupt_ledger()
    assert str(bad) == "%s: unreadable (%s)" % (path, problem)
    assert ledger.set_aside_ledger(bad) == path + ".corrupt"
    assert ledger.corrupt_ledger() == [] and ledger.set_aside_files() == [path + ".corrupt"]


@pytest.mark.parametrize("which", ["state", "ledger"])
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o722, 0o1777])
def test_a_state_or_ledger_dir_others_can_write_is_refused(tmp_path, which, mode):
    state = LocalState(str(tmp_path / "state"), lock_timeout=0.5, ledger_dir=str(tmp_path / "ledger"))
    directory = tmp_path / which
    directory.mkdir()
    os.chmod(directory, mode)
    message = "%s_dir %s is writable by others (mode %04o): refusing it" % (which, directory, mode)
    calls = {
        "state": [lambda: state.save(MapRecord("rbd/vm1", False)), lambda: state.records(),
                  lambda: state.load(SPEC, False), lambda: state.lock(SPEC).__enter__(),
                  lambda: state.claim("upkeep").__enter__()],
        "ledger": [lambda: state.pend_release(SPEC, BACKEND), lambda: state.note_registered(SPEC, BACKEND),
                   lambda: state.pending(), lambda: state.corrupt_ledger()],
    }[which]
    for call in calls:
        with pytest.raises(StateError) as info:
            call()
        assert str(info.value) == message
    assert [name for name in os.listdir(directory)] == []  # nothing was written there


def test_a_state_dir_not_owned_by_root_is_refused(tmp_path):
    os.makedirs(tmp_path / "state" / "maps", mode=0o700)
    os.chown(tmp_path / "state", 65534, 65534)
    state = LocalState(str(tmp_path / "state"))
    with pytest.raises(StateError) as info:
        state.records()
    assert str(info.value) == "state_dir %s is owned by uid 65534, not root (mode 0755): refusing it" % (
        tmp_path / "state")


def test_a_subdirectory_others_can_write_is_refused(state):
    state.save(MapRecord("rbd/vm1", False))
    os.chmod(state.maps_dir, 0o777)
    with pytest.raises(StateError, match="state_dir %s is writable by others \\(mode 0777\\)" % state.maps_dir):
        LocalState(os.path.dirname(state.maps_dir)).records()


def test_new_dirs_are_made_private(tmp_path):
    state = LocalState(str(tmp_path / "new" / "state"), ledger_dir=str(tmp_path / "new" / "ledger"))
    state.save(MapRecord("rbd/vm1", False))
    state.pend_release(SPEC, BACKEND)
    for path in (tmp_path / "new" / "state", tmp_path / "new" / "ledger", state.maps_dir, state.pending_dir):
        assert os.stat(path).st_mode & 0o777 == 0o700


def test_a_symlink_planted_where_a_lock_goes_is_not_followed(state, tmp_path):
    with state.lock(SPEC):
        pass  # the locks directory exists
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    for name in (SPEC.key + ".lock", "upkeep.claim", "nbd-map.0.slot"):
        link = os.path.join(state.locks_dir, name)
        _unlink_if(link)
        os.symlink(victim, link)
    with pytest.raises(StateError) as info:
        with state.lock(SPEC):
            pass
    assert str(info.value) == "%s is a symbolic link: refusing to follow it" % os.path.join(
        state.locks_dir, SPEC.key + ".lock")
    with pytest.raises(StateError, match="upkeep.claim is a symbolic link"):
        with state.claim("upkeep"):
            pass
    with pytest.raises(StateError, match="nbd-map.0.slot is a symbolic link"):
        with state.slot("nbd-map", 1):
            pass
    assert victim.read_text() == "precious\n" and os.stat(victim).st_mode & 0o777 == 0o644


def _unlink_if(path):
    if os.path.lexists(path):
        os.unlink(path)


def test_a_symlink_planted_where_a_temporary_file_goes_is_not_followed(state, tmp_path, mocker):
    state.save(MapRecord("rbd/vm1", False))
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    mocker.patch.object(state_mod.threading, "get_ident", return_value=42)
    tmp = "%s.%d.42.tmp" % (state._path(SPEC, False), os.getpid())
    os.symlink(victim, tmp)
    record = record_of(SPEC, False, manual=Holder(mode="w", since=1))
    state.save(record)  # the planted link is removed, never written through
    assert victim.read_text() == "precious\n"
    assert state.load(SPEC, False) == record and not os.path.lexists(tmp)


def test_a_temporary_file_left_by_a_killed_run_is_replaced(state, mocker):
    state.save(MapRecord("rbd/vm1", False))
    mocker.patch.object(state_mod.threading, "get_ident", return_value=42)
    tmp = "%s.%d.42.tmp" % (state._path(SPEC, False), os.getpid())
    _spoil(tmp, '{"half')
    state.save(record_of(SPEC, False, manual=Holder(mode="w", since=1)))
    assert not os.path.exists(tmp) and list(state.load(SPEC, False).holders) == ["manual"]


def test_a_symlink_planted_as_a_record_is_not_read(state, tmp_path):
    state.save(MapRecord("rbd/vm2", False))
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"image": "rbd/vm1", "read_only": False, "device": "/dev/sda"}))
    os.symlink(secret, state._path(SPEC, False))
    with pytest.raises(CorruptRecord) as info:
        state.load(SPEC, False)
    assert str(info.value) == "%s: unreadable (a symbolic link, not followed)" % state._path(SPEC, False)
    assert [r.image for r in state.records()] == ["rbd/vm2"]


def test_temporary_files_are_private(state, mocker):
    seen = []
    real = os.replace

    def replace(src, dst):
        seen.append(os.stat(src).st_mode & 0o777)
        return real(src, dst)
    mocker.patch.object(state_mod.os, "replace", side_effect=replace)
    state.save(MapRecord("rbd/vm1", False))
    assert seen == [0o600]


# ---- found by fuzzing (tests/fuzz/test_fuzz_state.py) --------------------------------

def test_a_directory_named_like_a_record_is_named_not_a_crash(state, ledger):
    """os.fdopen() refuses a directory (IsADirectoryError) before the regular-file check ran."""
    state.save(MapRecord("rbd/vm2", False))
    os.mkdir(state._path(SPEC, False))
    assert [r.image for r in state.records()] == ["rbd/vm2"]
    assert [str(bad) for bad in state.corrupt_records()] == [
        "%s: unreadable (not a regular file)" % state._path(SPEC, False)]
    with pytest.raises(CorruptRecord):
        state.load(SPEC, False)
    os.makedirs(ledger._pending_path(SPEC, BACKEND))
    assert ledger.pending() == []
    assert [str(bad) for bad in ledger.corrupt_ledger()] == [
        "%s: unreadable (not a regular file)" % ledger._pending_path(SPEC, BACKEND)]


@pytest.mark.parametrize("text, problem", [
    ("null", "null, not a JSON object"),  # read as "no such file": skipped, never named
    ("[" * 5000, "not JSON: "),  # RecursionError up to Python 3.12 ("nested too deeply"), a decode error in 3.13
    ('{"image": "rbd/vm1", "read_only": false, "holders": {"a\\nb": {"mode": "w"}}}', "holder 'a\\nb'"),
    ('{"image": "rbd/vm1", "read_only": false, "holders": {"a\\u001cb": {"mode": "w"}}}', "holder 'a\\x1cb'"),
    ('{"image": "rbd/vm1\\u001c", "read_only": false}', "image 'rbd/vm1\\x1c' has space around it"),
])
def test_a_record_the_fuzzer_found_unnamed_or_line_breaking_is_corrupt(state, text, problem):
    state.save(MapRecord("rbd/vm1", False))
    path = state._path(SPEC, False)
    _spoil(path, text)
    assert state.records() == []
    (bad,) = [str(bad) for bad in state.corrupt_records()]
    assert bad.startswith("%s: unreadable (%s" % (path, problem)) if problem.endswith(": ") \
        else bad == "%s: unreadable (%s)" % (path, problem)


@pytest.mark.parametrize("data, problem", [
    (None, "null, not a JSON object"),
    ({"image": "rbd/vm1", "holder": "manual\n", "since": 1}, "holder 'manual\\n'"),
    ({"image": "rbd/vm1", "holder": "back end", "since": 1}, "holder 'back end'"),
    ({"image": "rbd/vm1\u2028", "holder": "manual", "since": 1}, "image 'rbd/vm1\\u2028' has space around it"),
])
def test_a_pending_release_that_would_break_doctors_line_is_corrupt(ledger, data, problem):
    """doctor printed the holder and image as they were: a newline in one split its line."""
    os.makedirs(ledger.pending_dir)
    path = ledger._pending_path(SPEC, BACKEND)
    with open(path, "w") as handle:
        json.dump(data, handle)
    assert ledger.pending() == []
    assert [str(bad) for bad in ledger.corrupt_ledger()] == ["%s: unreadable (%s)" % (path, problem)]
