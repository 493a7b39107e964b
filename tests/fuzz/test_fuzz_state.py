"""Fuzz (d): this host's records (state_dir maps/*.json) and its ledger (ledger_dir pending/
and registered/*.json, the old state_dir pending/) as arbitrary JSON and bytes, with the
nbd request timeouts beside them.

Every reader (state.records() and its strict form, corrupt_records(), load(), holders_of_image(),
pending(), corrupt_ledger(), is_pending(), set_aside_files(), the request timeouts, showmapped's
attachments.host_mappings(), doctor's check_records(), release-pending) must use each file or
name it as unreadable in one line (a CorruptRecord with its path; a newer block-rbd's file: a
warning naming it), and never raise anything else.  The oracle is the per-file parser
(MapRecord/PendingRelease.from_json): what it takes, the lists hold; what it refuses, they name.
"""

import json
import logging
import os
import shutil
import tempfile
import urllib.parse

import pytest
from hypothesis import given, note, seed

from block_rbd import attachments, doctor, mappers
from block_rbd import config as config_mod
from block_rbd import state as state_mod
from block_rbd.cli import maps as maps_cli
from block_rbd.errors import ClusterError, CorruptRecord, StateError
from block_rbd.state import LocalState, MapRecord, PendingRelease
from block_rbd.target import parse_spec
from fuzzkit import SETTINGS, Genome, fast_dir, genomes, fuzzer  # noqa: F401 (fuzzer: a fixture)

SEED = 2604
MAX_PROBLEM = 300  # a message is its path and at most this much

SPECS = ["rbd/vm1", "rbd/vm1@snap", "rbd/ns/vm2", "pool2/img-3", "rbd/vm1@s2"]
HOLDERS = ["backend/vbd/5/51712", "manual", "backend/vbd/7/768"]
BOOT = state_mod.boot_id()


# ---- a case: the files of each directory, made from the genome -------------------------

def _record(g):
    holders = {g.pick(HOLDERS): {"mode": g.pick(["w", "r", "r!", "w!"]), "since": 1.7e9, "vm": "0b7b4ea0",
                                 "domid": "5", "devid": "51712"} for _ in range(g.below(3))}
    return {"image": g.pick(SPECS), "read_only": g.pick([False, True]), "mapper": g.pick(["krbd", "nbd", "fuse", None]),
            "device": g.pick(["/dev/rbd0", "/dev/nbd1", None]), "holders": holders,
            "cookie": g.pick([None, "c00k1e"]), "options": g.pick([[], ["queue_depth=128"]]),
            "version": g.pick([3, 3, 2, 1])}


def _pending(g):
    return {"image": g.pick(SPECS), "holder": g.pick(HOLDERS), "since": g.pick([1.7e9, 0, 1]),
            "reason": g.pick(["", "the cluster did not answer"]), "version": 3}


def _note(g):
    return {"image": g.pick(SPECS), "holder": g.pick(HOLDERS), "since": 1.7e9,
            "boot": g.pick([BOOT, "an-earlier-boot"]), "version": 3}


def _timeout(g):
    return {"device": g.pick(["/dev/nbd0", "/dev/nbd1"]), "cookie": "c00k1e", "image": "rbd/vm1",
            "until": g.pick([12.5, 0, -1]), "after": "a heal"}


def mutate(g, data):
    """A few fields of `data` gone or changed into any JSON value: its holders' fields too."""
    for _ in range(g.below(4)):
        target = data
        holders = data.get("holders")
        if isinstance(holders, dict) and holders and g.one_in(3):
            target = holders[g.pick(sorted(holders))]
            if not isinstance(target, dict):
                continue
        key = g.pick(sorted(target) + ["version", "an-unknown-field"])
        if g.one_in(4):
            target.pop(key, None)
        else:
            target[key] = g.json()
    return data


JUNK = [b"", b"{", b"null", b"[]", b"{}", b'{"version": 3}', b"\xff\xfe", b"{}\n{}", b"NaN", b'"text"', b"0",
        b'{"version": 4}', b'{"version": true}', b"\xef\xbb\xbf{}"]


def content(g, template):
    kind = g.below(10)
    if kind < 6:
        data = template(g)
        return json.dumps(mutate(g, data) if kind else data).encode()  # NaN and Infinity too
    if kind == 6:
        return json.dumps(g.json(3)).encode()
    if kind == 7:
        return g.raw(64)
    if kind == 8:
        return g.pick(JUNK)
    # deep nesting: json decodes recursively
    return (g.pick(["[", '{"a": ', '[{"b": ']) * (900 + g.below(600))).encode()


SUFFIXES = {"maps": [".json", ".rw.json", ".ro.json", ".json.corrupt", ".json.1.2.tmp", ""],
            "ledger": [".json", ".json.corrupt", ""], "nbd-timeouts": [".json", ""]}


def name(g, kind):
    if g.below(3):  # what block-rbd itself names them
        if kind == "maps":
            return "%s.%s.json" % (parse_spec(g.pick(SPECS)).key, g.pick(["rw", "ro"]))
        if kind == "nbd-timeouts":
            return g.pick(["nbd0.json", "nbd1.json"])
        return "%s.%s.json" % (parse_spec(g.pick(SPECS)).head().key, urllib.parse.quote(g.pick(HOLDERS), safe=""))
    # anything else (never "." or "..", nor the symbolic links' .target)
    junk = "x" + g.text(12, "abcdefghijklmnopqrstuvwxyz0123456789%._-@")
    return junk + g.pick(SUFFIXES.get(kind, SUFFIXES["ledger"]))


# what is at a name: mostly a file; sometimes a link, a directory or a FIFO
ENTRY_KINDS = ["file"] * 13 + ["symlink", "dir", "fifo"]
LAYOUT = [("maps", 4, _record), ("pending", 3, _pending), ("registered", 3, _note), ("old_pending", 2, _pending),
          ("nbd-timeouts", 2, _timeout)]


def build(g):
    """{directory kind: [(name, entry kind, bytes)]}, names unique in each."""
    files = {}
    for kind, most, template in LAYOUT:
        entries = {}
        for _ in range(g.below(most + 1)):
            entry_name = name(g, "maps" if kind == "maps" else kind if kind == "nbd-timeouts" else "ledger")
            entries[entry_name] = (entry_name, g.pick(ENTRY_KINDS), content(g, template))
        files[kind] = list(entries.values())
    return files


# ---- doubles ---------------------------------------------------------------------------

class NoMapper:
    """No mapper is usable: host_mappings() lists block-rbd's own records only."""

    def __init__(self, name):
        self.name = name

    def unavailable(self):
        return "not on this fuzzer's host"


class Registry:
    """Releases succeed, except where told: then the cluster does not answer."""

    def __init__(self):
        self.released = []
        self.down = False

    def release(self, cluster, spec, holder):
        if self.down:
            raise ClusterError("the cluster does not answer (fuzzer)")
        self.released.append((str(spec), holder))


class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


# ---- checks ----------------------------------------------------------------------------

def one_line(text, limit=None):
    assert len(text.splitlines()) <= 1, text
    if limit is not None:
        assert len(text) <= limit, text


def check_named(exc, paths):
    """A CorruptRecord (or StateError) names one of `paths`, in one bounded line."""
    assert isinstance(exc, StateError), repr(exc)
    message = str(exc)
    named = [p for p in paths if p in message]
    assert named, (message, paths)
    one_line(message, max(len(p) for p in named) + MAX_PROBLEM)
    if isinstance(exc, CorruptRecord):
        assert exc.path in paths and exc.path in message


def verdict(path, parse):
    """What the per-file parser says of `path`: ("used", value), ("corrupt", None) or ("newer", None)."""
    try:
        data = state_mod._read_json(path)
        return "used", parse(data, path)
    except CorruptRecord as exc:
        assert exc.path == path
        return "corrupt", None
    except StateError as exc:
        assert path in str(exc)
        return "newer", None


def note_verdict(data_path):
    try:
        return "used", state_mod._registration_note(state_mod._read_json(data_path), data_path)
    except CorruptRecord:
        return "corrupt", None


# ---- the fuzzer ------------------------------------------------------------------------

@pytest.fixture
def dirs():
    top = tempfile.mkdtemp(prefix="brbdfz", dir=fast_dir())
    yield top
    shutil.rmtree(top, ignore_errors=True)


def make(directory, name, kind, data):
    path = os.path.join(directory, name)
    if kind == "file":
        with open(path, "wb") as handle:
            handle.write(data)
    elif kind == "symlink":
        target = os.path.join(directory, ".target")
        with open(target, "wb") as handle:
            handle.write(data)
        os.symlink(target, path)
    elif kind == "dir":
        os.mkdir(path, 0o700)
    else:
        os.mkfifo(path, 0o600)
    return path


def test_fuzz_records_and_ledger(dirs, fuzzer, mocker):
    tally = fuzzer("records and ledger (d)", SEED)
    warnings = Warnings()
    logger = logging.getLogger("block-rbd")
    logger.addHandler(warnings)
    logger.propagate = False  # not into pytest's capture: 10,000 cases of warnings (conftest restores it)
    mocker.patch.object(mappers, "get", side_effect=lambda name, config, cluster=None: NoMapper(name))

    @seed(SEED)
    @SETTINGS
    @given(genomes())
    def case(genome):
        files = build(Genome(genome))
        note(repr(files))
        state_dir, ledger_dir = os.path.join(dirs, "state"), os.path.join(dirs, "ledger")
        for top in (state_dir, ledger_dir):
            shutil.rmtree(top, ignore_errors=True)
        state = LocalState(state_dir, 0.2, ledger_dir)
        where = {"maps": state.maps_dir, "pending": state.pending_dir, "registered": state.registered_dir,
                 "old_pending": state.old_pending_dirs[0], "nbd-timeouts": state.timeouts_dir}
        made = {}
        for kind_of_file, directory in where.items():
            os.makedirs(directory, 0o700)
            names = {name for name, _kind, _data in files[kind_of_file]}
            made[kind_of_file] = [
                # (no directory where setting a file aside renames onto one, or a directory onto a
                # file: os.replace() cannot, and nothing but an operator makes either)
                make(directory, name, "fifo" if kind == "dir" and (name.endswith(state_mod.CORRUPT) or
                                                                    name + state_mod.CORRUPT in names) else kind, data)
                for name, kind, data in files[kind_of_file]]
        json_files = {k: [p for p in paths if p.endswith(".json")] for k, paths in made.items()}
        all_paths = [p for paths in made.values() for p in paths]
        del warnings.lines[:]

        # -- the mapping records
        records, corrupt = state.records(), state.corrupt_records()
        for exc in corrupt:
            check_named(exc, json_files["maps"])
        corrupt_paths = {exc.path for exc in corrupt}
        newer = [line for line in warnings.lines if "newer block-rbd" in line]
        used = [r.to_json() for r in records]
        for path in json_files["maps"]:
            said, record = verdict(path, MapRecord.from_json)
            if said == "used":
                assert record.to_json() in used, path
            elif said == "corrupt":
                assert path in corrupt_paths, path
            else:
                assert any(path in line for line in newer), path
        assert len(records) + len(corrupt) + len(newer) == len(json_files["maps"])
        try:
            strict = state.records(strict=True)
        except StateError as exc:
            check_named(exc, json_files["maps"])
            assert corrupt or newer
        else:
            assert not corrupt and not newer and [r.to_json() for r in strict] == used
        for spec_text in SPECS:
            spec = parse_spec(spec_text)
            for read_only in (False, True):
                try:
                    got = state.load(spec, read_only)
                except StateError as exc:
                    check_named(exc, json_files["maps"])
                else:
                    assert got is None or isinstance(got, MapRecord)
            try:
                holders = state.holders_of_image(spec)
            except StateError as exc:
                check_named(exc, json_files["maps"])
            else:
                assert isinstance(holders, set)

        # -- the ledger
        pending, corrupt_ledger = state.pending(), state.corrupt_ledger()
        ledger_files = json_files["pending"] + json_files["old_pending"] + json_files["registered"]
        for exc in corrupt_ledger:
            check_named(exc, ledger_files)
        corrupt_paths = {exc.path for exc in corrupt_ledger}
        keys = {(item.image, item.holder) for item in pending}
        for path in json_files["pending"] + json_files["old_pending"]:
            said, item = verdict(path, PendingRelease.from_json)
            if said == "used":
                assert (item.image, item.holder) in keys, path
            elif said == "corrupt":
                assert path in corrupt_paths, path
            else:
                assert any(path in line for line in warnings.lines), path
        for path in json_files["registered"]:
            said, registration = note_verdict(path)
            if said == "used":
                image, holder, _since, boot = registration
                assert boot == BOOT or (image, holder) in keys, path
            else:
                assert path in corrupt_paths, path
        for item in pending:
            assert isinstance(state.is_pending(item.spec, item.holder), bool)
        assert set(state.set_aside_files()) <= set(all_paths)

        # -- the nbd request timeouts
        for timeout in state.request_timeouts():
            assert state_mod._is_timeout(timeout)
        for device in ("/dev/nbd0", "/dev/nbd1"):
            got = state.request_timeout(device)
            assert got is None or state_mod._is_timeout(got)

        # -- what showmapped, doctor and release-pending make of it all
        config = config_mod.from_dict({"state_dir": state_dir, "ledger_dir": ledger_dir, "timeouts": {"lock": 0.2}})
        for row in attachments.host_mappings(config):
            if row["corrupt"]:
                one_line(maps_cli._unreadable(row))
        for level, message in doctor.check_records(config, None):
            assert level in (doctor.OK, doctor.WARN, doctor.FAIL)
            one_line(message)
        registry = Registry()
        registry.down = bool(pending) and len(pending) % 2 == 0
        done, left = attachments.release_pending(config, object(), registry)
        assert len(done) + len(left) <= len(pending)
        assert state.corrupt_ledger() == [], "release-pending sets every unreadable ledger file aside"
        for line in warnings.lines:
            one_line(line)
        tally.case("corrupt" if corrupt or corrupt_ledger else "used")

    try:
        case()
    finally:
        logger.removeHandler(warnings)
    tally.finish()
