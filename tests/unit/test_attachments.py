"""The engine under add/remove/map (block_rbd/attachments.py) with mapper and registry
doubles: what a remove does when this host's record of a mapping cannot be read, and
how showmapped, status, doctor and release-pending name such a record."""

import json
import logging
import os

import pytest
from click.testing import CliRunner

from block_rbd import attachments, doctor, mappers
from block_rbd import config as config_mod
from block_rbd.cli import cli
from block_rbd.errors import ClusterError, CorruptRecord, DeviceBusy
from block_rbd.mappers.base import Mapping
from block_rbd.state import Holder, MapRecord, local_state
from block_rbd.target import ImageSpec

SPEC = ImageSpec("rbd", "vm1")
BACKEND = "backend/vbd/5/51712"


class FakeMapper:
    """A mapper whose mappings are what the kernel (or its daemons) shows: `shown`."""

    def __init__(self, name, shown, unmapped, busy=False):
        self.name, self.shown, self.unmapped, self.busy = name, shown, unmapped, busy

    def unavailable(self):
        return None

    def mapped(self):
        return [m for m in self.shown if m.mapper == self.name]

    def find(self, spec, read_only):
        for mapping in self.mapped():
            if mapping.spec == spec and mapping.read_only == read_only:
                return mapping
        return None

    def unmap(self, mapping):
        if self.busy:
            raise DeviceBusy("%s is still in use after 0 s; close it (or stop the guest) and retry" % mapping.device)
        self.shown.remove(mapping)
        self.unmapped.append(mapping.device)

    def discard_partial(self, spec, read_only):
        pass


class FakeRegistry:
    def __init__(self, down=False):
        self.released, self.down = [], down

    def release(self, cluster, spec, holder):
        if self.down:
            raise ClusterError("the cluster did not answer")
        self.released.append((str(spec), holder))


@pytest.fixture
def host(tmp_path, monkeypatch):
    """A config, this host's state, and mappers showing `host.shown` (nbd: /dev/nbd0 of rbd/vm1)."""
    class Host:
        pass
    h = Host()
    h.config = config_mod.from_dict({"state_dir": str(tmp_path / "state"), "ledger_dir": str(tmp_path / "ledger"),
                                     "host": "testhost"})
    h.state = local_state(h.config)
    h.shown = [Mapping("nbd", SPEC, False, "/dev/nbd0", {"pid": 7})]
    h.unmapped = []
    h.busy = False
    monkeypatch.setattr(mappers, "get", lambda name, config, cluster=None: FakeMapper(name, h.shown, h.unmapped,
                                                                                      h.busy))
    return h


def corrupt_record(h, text='{"image": "rbd/vm1", "read_only": false, "mapper": "nb'):
    record = MapRecord("rbd/vm1", False, "nbd", "/dev/nbd0", {BACKEND: Holder(mode="w", since=1)})
    h.state.save(record)
    path = h.state._path(SPEC, False)
    with open(path, "w") as handle:
        handle.write(text)  # truncated: a full disk, a crash of the filesystem
    return path


# ---- remove with an unreadable record ----------------------------------------------------

def test_remove_with_a_truncated_record_unmaps_what_is_mapped_and_sets_the_record_aside(host, caplog):
    path = corrupt_record(host)
    host.state.note_registered(SPEC, BACKEND)
    registry = FakeRegistry()
    caplog.set_level(logging.INFO, "block-rbd")
    done = attachments.detach(host.config, None, SPEC, False, BACKEND, registry)
    assert done == "unmapped what was mapped; the unreadable record set aside"
    assert host.unmapped == ["/dev/nbd0"]  # found by the mapper, not by the record
    assert not os.path.exists(path) and os.path.exists(path + ".corrupt")
    assert registry.released == [("rbd/vm1", BACKEND)]  # released cluster-wide all the same
    assert host.state.pending() == [] and host.state.corrupt_records() == []
    lines = [r.getMessage() for r in caplog.records]
    assert ("%s: unreadable (not JSON: Unterminated string starting at: line 1 column 52 (char 51)); unmapping "
            "rbd/vm1 (rw) as this host's mappers show it" % path) in lines
    assert "set the unreadable record %s aside as %s.corrupt" % (path, path) in lines
    # a repeat remove: nothing recorded, nothing to do
    assert attachments.detach(host.config, None, SPEC, False, BACKEND, registry) == "nothing to do"


@pytest.mark.parametrize("text", ['{"image": "rbd/vm1", "holders": {}}', "", "[]"])
def test_remove_with_a_record_missing_a_field_still_unmaps(host, text):
    corrupt_record(host, text)
    attachments.detach(host.config, None, SPEC, False, BACKEND, FakeRegistry())
    assert host.unmapped == ["/dev/nbd0"]


def test_remove_with_a_corrupt_record_and_the_cluster_down_leaves_the_release_pending(host):
    corrupt_record(host)
    done = attachments.detach(host.config, None, SPEC, False, BACKEND, FakeRegistry(down=True))
    assert done == "unmapped what was mapped; the unreadable record set aside; cluster-wide release pending"
    assert [(p.image, p.holder) for p in host.state.pending()] == [("rbd/vm1", BACKEND)]


def test_a_device_still_in_use_stays_mapped_and_so_does_its_record(host):
    path = corrupt_record(host)
    host.busy = True  # another holder, which the record no longer names, has it open
    done = attachments.detach(host.config, None, SPEC, False, BACKEND, FakeRegistry())
    assert done == ("left mapped, the record as it is: /dev/nbd0 is still in use after 0 s; close it (or stop "
                    "the guest) and retry")
    assert host.unmapped == [] and os.path.exists(path)


def test_an_attach_over_a_corrupt_record_is_refused_naming_it(host):
    path = corrupt_record(host)
    with pytest.raises(CorruptRecord, match="^%s: unreadable" % path):
        host.state.load(SPEC, False)
    with pytest.raises(CorruptRecord):  # holders_of (unmap) reads the same record
        attachments.holders_of(host.config, SPEC, False)


# ---- release-pending with an unreadable ledger file ----------------------------------------

def test_release_pending_sets_a_corrupt_pending_file_aside_and_does_the_rest(host, caplog):
    host.state.pend_release(ImageSpec("rbd", "vm2"), "manual")
    bad = host.state._pending_path(SPEC, BACKEND)
    with open(bad, "w") as handle:
        json.dump({"image": 5, "holder": BACKEND, "since": 1}, handle)  # spec of 5: once a crash
    registry = FakeRegistry()
    done, left = attachments.release_pending(host.config, None, registry)
    assert [(p.image, p.holder) for p in done] == [("rbd/vm2", "manual")] and left == []
    assert registry.released == [("rbd/vm2", "manual")]
    assert os.path.exists(bad + ".corrupt") and not os.path.exists(bad)
    assert any(r.getMessage().startswith("%s: unreadable (field 'image' is 5); set aside as %s.corrupt" % (bad, bad))
               for r in caplog.records)
    assert attachments.release_pending(host.config, None, registry) == ([], [])  # once only


def test_release_pending_leaves_a_release_whose_image_has_a_corrupt_record_pending(host):
    corrupt_record(host)
    host.state.pend_release(SPEC, "backend/vbd/9/51712")
    host.state.pend_release(ImageSpec("rbd", "vm2"), "manual")
    registry = FakeRegistry()
    done, left = attachments.release_pending(host.config, None, registry)
    assert [p.image for p in done] == ["rbd/vm2"] and left == []
    assert [(p.image, p.holder) for p in host.state.pending()] == [("rbd/vm1", "backend/vbd/9/51712")]


# ---- showmapped, status, doctor name it ------------------------------------------------------

def test_host_mappings_show_a_corrupt_record_with_its_device(host):
    path = corrupt_record(host)
    host.shown.append(Mapping("nbd", ImageSpec("rbd", "vm3"), True, "/dev/nbd1", {}))
    other = corrupt_record_of(host, ImageSpec("rbd", "vm4"), True)  # nothing mapped of it
    problem = "not JSON: Unterminated string starting at: line 1 column 52 (char 51)"
    rows = attachments.host_mappings(host.config)
    assert rows == [
        {"image": "rbd/vm1", "snap": None, "mode": "rw", "mapper": "nbd", "device": "/dev/nbd0", "backends": [],
         "manual": False, "managed": True, "pending_release": False,
         "corrupt": "%s: unreadable (%s)" % (path, problem)},
        {"image": "rbd/vm3", "snap": None, "mode": "ro", "mapper": "nbd", "device": "/dev/nbd1", "backends": [],
         "manual": False, "managed": False, "pending_release": False, "corrupt": None},
        {"image": "rbd/vm4", "snap": None, "mode": "ro", "mapper": None, "device": None, "backends": [],
         "manual": False, "managed": True, "pending_release": False, "corrupt": "%s: unreadable (not JSON: "
                                                                                "Expecting value: line 1 column 1 "
                                                                                "(char 0))" % other},
    ]


def corrupt_record_of(h, spec, read_only):
    path = h.state._path(spec, read_only)
    with open(path, "w") as handle:
        handle.write("")
    return path


def test_showmapped_names_a_corrupt_record_and_a_corrupt_pending_file(host, monkeypatch, tmp_path):
    path = corrupt_record(host)
    bad = host.state._pending_path(SPEC, BACKEND)
    os.makedirs(os.path.dirname(bad), exist_ok=True)
    with open(bad, "w") as handle:
        handle.write("{")
    cfg = tmp_path / "block-rbd.yaml"
    cfg.write_text("state_dir: %s\nledger_dir: %s\nlog: {file: null, syslog: false}\n"
                   % (host.config["state_dir"], host.config["ledger_dir"]))
    result = CliRunner().invoke(cli, ["--config", str(cfg), "showmapped"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == ["rbd/vm1", "-", "rw", "nbd", "/dev/nbd0", "(unreadable", "record)"]
    assert lines[2:] == [
        "unreadable record: %s: unreadable (not JSON: Unterminated string starting at: line 1 column 52 (char 51)); "
        "the remove (or unmap) of its disk unmaps what is mapped and sets it aside" % path,
        "unreadable ledger file: %s: unreadable (not JSON: Expecting property name enclosed in double quotes: "
        "line 1 column 2 (char 1)); block-rbd release-pending sets it aside" % bad]
    rows = json.loads(CliRunner().invoke(cli, ["--config", str(cfg), "showmapped", "--format", "json"]).output)
    assert [(r["image"], bool(r["corrupt"]), r["pending_release"]) for r in rows] == [
        ("rbd/vm1", True, False), (None, True, True)]


def test_doctor_reports_corrupt_records_ledger_files_and_files_set_aside(host):
    path = corrupt_record(host)
    bad = host.state._pending_path(SPEC, BACKEND)
    os.makedirs(os.path.dirname(bad), exist_ok=True)
    with open(bad, "w") as handle:
        json.dump({"holder": BACKEND}, handle)
    aside = corrupt_record_of(host, ImageSpec("rbd", "vm4"), True)
    host.state.set_aside(ImageSpec("rbd", "vm4"), True)
    assert doctor.check_records(host.config, None) == [
        (doctor.WARN, "%s: unreadable (not JSON: Unterminated string starting at: line 1 column 52 (char 51)): "
                      "the remove of its disk unmaps what is mapped and sets it aside" % path),
        (doctor.WARN, "%s: unreadable (no field 'image'): a pending release or registration note; block-rbd "
                      "release-pending sets it aside" % bad),
        (doctor.WARN, "%s.corrupt: set aside, unreadable; what it named may still be registered in Ceph "
                      "(block-rbd locks IMAGE): check, then delete it" % aside),
    ]


def test_doctor_fails_an_untrusted_state_dir_in_one_line(host):
    host.state.save(MapRecord("rbd/vm1", False))
    os.chmod(host.config["state_dir"], 0o777)
    assert doctor.check_records(host.config, None) == [
        (doctor.FAIL, "state_dir %s is writable by others (mode 0777): refusing it" % host.config["state_dir"])]


def test_unmap_of_a_target_whose_record_is_unreadable_unmaps_it(host, tmp_path, mocker):
    from block_rbd.cli import maps
    path = corrupt_record(host)
    registry = FakeRegistry()
    mocker.patch.object(maps, "Registry", return_value=registry)
    cfg = tmp_path / "block-rbd.yaml"
    cfg.write_text("state_dir: %s\nledger_dir: %s\nlog: {file: null, syslog: false}\n"
                   % (host.config["state_dir"], host.config["ledger_dir"]))
    result = CliRunner().invoke(cli, ["--config", str(cfg), "unmap", "rbd/vm1"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == \
        "rbd/vm1 (rw): unmapped what was mapped; the unreadable record set aside"
    assert host.unmapped == ["/dev/nbd0"] and os.path.exists(path + ".corrupt")
    assert registry.released == [("rbd/vm1", "manual")]
