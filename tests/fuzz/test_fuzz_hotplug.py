"""Fuzz (a): the backend nodes a hotplug `add` reads, as arbitrary bytes: params, mode,
frontend-id, and the frontend domain's vm path and name (what hotplug.add reads through
Backend).  The real run (hotplug.run, as libxl's script calls it in-process) against the
xenstored double, with the real local state, lock and undo (attachments.attach), and cheap
doubles for the cluster, the registry and the mappers, which fail where the case says.

Each case ends in exit 0 with physical-device written and hotplug-status=connected (and
then a `remove` that leaves nothing), or in exit 1 with hotplug-status=error and one line
in hotplug-error that fits one xenstore write (4096 bytes with its path), no internal
error, no traceback in the log, and nothing left behind: no record or ledger file in the
state and ledger dirs, no local lock held, nothing registered or mapped in the doubles.
"""

import fcntl
import os
import shutil
import stat
import tempfile

import pytest
from hypothesis import given, note, seed

from block_rbd import hotplug, images, mappers
from block_rbd import xenstore as xs_mod
from block_rbd.errors import (AccessRefused, ClusterError, ImageNotFound, MapperError, MapperUnavailable,
                              XenstoreError)
from block_rbd.mappers.base import Mapping
from fuzzkit import SETTINGS, Genome, fast_dir, genomes, fuzzer  # noqa: F401 (fuzzer: a fixture)

SEED = 2601
PATH = "backend/vbd/5/51712"
FULL = "/local/domain/0/" + PATH
DOMAIN = "/local/domain/5"

# ---- the case: the five nodes and where the doubles fail -----------------------------------

HEADS = ["rbd:vm1", "rbd/vm1", "vm1", "rbd/ns/vm1", "rbd/vm1@snap", "pool2/img", "rbd:vm 1", "", " ", "rbd/-x",
         "a/b/c/d", "rbd:a/b", "rbd/vm1@", "@snap", "rbd/..", "rbd/vm1\n", "rbd/caf\u00e9", "rbd/" + "v" * 300,
         "rbd:vm1:x", "rbd/vm1@s@t"]
OPTIONS = ["mode=r", "mode=w", "mode=r!", "mode=w!", "mode=x", "mode=", "mapper=krbd", "mapper=nbd", "mapper=fuse",
           "mapper=floppy", "qos=iops:500", "qos=none", "qos=iops:\u00b2", "qos=bps:" + "9" * 30, "qos=iops:500+iops:1",
           "clone=rbd/golden@v1", "clone=rbd/golden", "size=10G", "size=" + "9" * 40, "map_options=queue_depth=128",
           "map_options=key=x", "map_options=-x", "", "x", "=", "mode=r,mode=w", " mode = r "]
MODES = ["w", "r", "", "x", "w!", "r!", "R", " w", "w\n", "rw"]
FRONTENDS = ["5", "5", "5", "0", "", "7", "5/../0", "-1", "99999999999", "5/", "/local/domain/5", "5\x00"]
VMS = [None, "/vm/0b7b4ea0-1f53-4d1e-9a8e-4c5d6e7f8091", "", "/", "0b7b4ea0", "/vm/", "/vm/a b\nc",
       "/vm/00000000-0000-0000-0000-000000000000"]
NAMES = [None, "web1", "web1--incoming", "--incoming", "", "Domain-0", "a\nb--incoming"]
FAULTS = [None] * 8 + ["check_image", "clone", "acquire", "map", "map-unavailable", "mapped", "publish"]
MESSAGES = ["injected", "line one\nline two\r\nthree", "x" * 5000, "caf\u00e9 \u2028 \x85 \x1c sep", "\u2603" * 2000,
            "", "tab\there"]


def blob(g, choices):
    """A node's value: absent, one of `choices`, text, or bytes that need not be UTF-8."""
    kind = g.below(16)
    if kind < 8:
        value = g.pick(choices)
        return None if value is None else value.encode()
    if kind < 11:
        return g.text(20).encode("utf-8", "surrogatepass")
    if kind < 14:
        return bytes(g.raw(24))
    if kind == 14:
        return None
    return (bytes(g.raw(16)) or b"x") * (100 + g.below(150))  # up to ~4 KB


VALID = {"head": ["rbd:vm1", "rbd/vm1", "vm1", "rbd/ns/vm1", "rbd/vm1@snap", "pool2/img"],
         "option": ["mode=r", "mode=w", "mode=r!", "mode=w!", "mapper=krbd", "mapper=nbd", "mapper=fuse", "qos=none",
                    "qos=iops:500", "clone=rbd/golden@v1", "map_options=queue_depth=128"],
         "mode": ["w", "r"], "frontend-id": ["5", "0"], "vm": VMS[:2], "name": NAMES[:3]}


def params(g):
    if g.below(4):  # a target, near valid
        parts = [g.pick(HEADS)] + [g.pick(OPTIONS) if g.below(4) else g.text(8) for _ in range(g.below(4))]
        text = ",".join(parts)
        return (g.pick(["", " ", "\t"]) + text + g.pick(["", " ", "\n"])).encode()
    return blob(g, HEADS)


def valid_params(g):
    options = {}
    for _ in range(g.below(3)):
        option = g.pick(VALID["option"])
        options.setdefault(option.split("=")[0], option)  # each key once
    return ",".join([g.pick(VALID["head"])] + list(options.values())).encode()


def build(g):
    """The five nodes: each valid, or (one in four) anything; where a double fails, and how."""
    nodes = {"params": valid_params(g)}
    for name in ("mode", "frontend-id", "vm", "name"):
        value = g.pick(VALID[name])
        nodes[name] = None if value is None else value.encode()
    anything = {"params": params, "mode": lambda g: blob(g, MODES), "frontend-id": lambda g: blob(g, FRONTENDS),
                "vm": lambda g: blob(g, VMS), "name": lambda g: blob(g, NAMES)}
    for name, make in anything.items():
        if g.one_in(4):
            nodes[name] = make(g)
    return nodes, g.pick(FAULTS), g.pick(MESSAGES)


# ---- the doubles ----------------------------------------------------------------------------

class World:
    """What the doubles share: the case's fault, what is registered and mapped."""

    def __init__(self, device):
        self.device = device
        self.fault = None
        self.hit = None  # where the case's fault was raised, if it was reached
        self.message = ""
        self.registered = {}
        self.mapped = {}

    def fail(self, where):
        if self.fault != where:
            return
        self.hit = where
        error = {"check_image": ImageNotFound, "clone": ClusterError, "map": MapperError,
                 "map-unavailable": MapperUnavailable, "mapped": ClusterError}.get(where)
        if where == "acquire":
            raise AccessRefused("refused: %s (VM 0db9c7fb, client 10.0.0.2:0/1)" % self.message,
                                "refused: %s (a VM)" % self.message)
        if where == "publish":
            raise XenstoreError("xenstore write: %s" % self.message)
        raise error("%s: %s" % (where, self.message))


WORLD = None


class FakeCluster:
    connected = True

    def __init__(self, config):
        pass

    def serves(self, config):
        return True

    def check_image(self, spec):
        WORLD.fail("check_image")

    def close(self):
        pass


class FakeRegistry:
    def __init__(self, config):
        pass

    def acquire(self, cluster, spec, request, local_holders=frozenset()):
        WORLD.fail("acquire")
        if not spec.snap:  # as the registry: snapshots are not arbitrated
            WORLD.registered[(str(spec.head()), request.holder)] = request
        return "token"

    def mapped(self, cluster, spec, token, mapping):
        WORLD.fail("mapped")

    def release(self, cluster, spec, holder):
        if not spec.snap:
            WORLD.registered.pop((str(spec.head()), holder), None)


class FakeMapper:
    def __init__(self, name):
        self.name = name

    def unavailable(self):
        return None

    def map(self, spec, read_only, options=()):
        WORLD.fail("map")
        WORLD.fail("map-unavailable")
        details = {"cookie": "c00k1e", "options": list(options)} if self.name == "nbd" else {}
        mapping = Mapping(self.name, spec, read_only, WORLD.device, details)
        WORLD.mapped[(str(spec), read_only)] = mapping
        return mapping

    def find(self, spec, read_only):
        return WORLD.mapped.get((str(spec), read_only))

    def mapped(self):
        return list(WORLD.mapped.values())

    def unmap(self, mapping):
        WORLD.mapped.pop((str(mapping.spec), mapping.read_only), None)

    def discard_partial(self, spec, read_only):
        pass


def choose(config, requested=None, cluster=None):
    return FakeMapper(requested or ("krbd" if config["mapper"] == "auto" else config["mapper"]))


def get(name, config, cluster=None):
    return FakeMapper(name)


def ensure_clone(cluster, target):
    WORLD.fail("clone")


# ---- checks ---------------------------------------------------------------------------------

def keys(xenstored):
    return {k[len(FULL) + 1:]: v for k, v in xenstored.tree(FULL).items() if k != FULL}


def files_below(directory):
    found = []
    for top, _dirs, names in os.walk(directory):
        found += [os.path.join(top, name) for name in names]
    return found


def assert_nothing_left(state_dir, ledger_dir):
    assert WORLD.registered == {}, WORLD.registered
    assert WORLD.mapped == {}, WORLD.mapped
    left = [p for p in files_below(state_dir) + files_below(ledger_dir) if "/locks/" not in p]
    assert left == [], left
    locks = os.path.join(state_dir, "locks")
    for name in os.listdir(locks) if os.path.isdir(locks) else []:
        fd = os.open(os.path.join(locks, name), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError: a lock still held
        finally:
            os.close(fd)


def assert_log_clean(log):
    with open(log) as handle:
        text = handle.read()
    assert "Traceback" not in text and "internal error" not in text, text


# ---- the fuzzer -----------------------------------------------------------------------------

@pytest.fixture
def world(xenstored, monkeypatch, mocker):
    global WORLD
    top = tempfile.mkdtemp(prefix="brbdfz", dir=fast_dir())
    device = os.path.join(top, "dev-rbd0")
    os.mknod(device, stat.S_IFBLK | 0o600, os.makedev(251, 3))
    log = os.path.join(top, "xen-hotplug.log")
    cfg = os.path.join(top, "block-rbd.yaml")
    with open(cfg, "w") as handle:
        handle.write("pool: rbd\nmapper: auto\nhost: testhost\nstate_dir: %s/state\nledger_dir: %s/ledger\n"
                     "log: {file: %s, syslog: false}\ntimeouts: {hotplug: 20}\n" % (top, top, log))
    os.chmod(cfg, 0o600)
    monkeypatch.setenv("BLOCK_RBD_CONFIG", cfg)
    WORLD = World(device)
    mocker.patch.object(hotplug, "Cluster", FakeCluster)
    mocker.patch.object(hotplug, "Registry", FakeRegistry)
    mocker.patch.object(mappers, "choose", choose)
    mocker.patch.object(mappers, "get", get)
    mocker.patch.object(images, "ensure_clone", ensure_clone)
    connected = hotplug.Backend.connected

    def publish(self, mapping, mode):
        WORLD.fail("publish")
        return connected(self, mapping, mode)
    mocker.patch.object(hotplug.Backend, "connected", publish)
    WORLD.top, WORLD.log, WORLD.xs = top, log, xenstored
    yield WORLD
    WORLD = None
    shutil.rmtree(top, ignore_errors=True)


def test_fuzz_backend_nodes(world, fuzzer):
    tally = fuzzer("backend nodes (a)", SEED)
    state_dir, ledger_dir = os.path.join(world.top, "state"), os.path.join(world.top, "ledger")
    xs = world.xs
    error_key = PATH + "/hotplug-error"

    @seed(SEED)
    @SETTINGS
    @given(genomes())
    def case(genome):
        nodes, world.fault, world.message = build(Genome(genome))
        world.hit = None
        note(repr((nodes, world.fault, world.message)))
        for gone in (FULL, DOMAIN):
            if xs.exists(gone):
                xs.rm(gone)
        for name in ("params", "mode", "frontend-id"):
            if nodes[name] is not None:
                xs.write("%s/%s" % (FULL, name), nodes[name])
        for name in ("vm", "name"):
            if nodes[name] is not None:
                xs.write("%s/%s" % (DOMAIN, name), nodes[name])
        open(world.log, "w").close()

        code = hotplug.run("add", PATH)
        got = keys(xs)
        if code == 0:
            assert got.get("hotplug-status") == "connected", got
            assert "physical-device" in got and "hotplug-error" not in got, got
            assert hotplug.run("remove", PATH) == 0
            outcome = "connected"
        else:
            assert code == 1, code
            assert got.get("hotplug-status") == "error", got
            assert "physical-device" not in got, got
            error = got.get("hotplug-error")
            assert error and len(error.splitlines()) == 1, error
            assert len(error_key.encode()) + 1 + len(error.encode("utf-8", "surrogateescape")) <= xs_mod.PAYLOAD_MAX
            outcome = "failed at %s" % world.hit if world.hit else "refused before attaching"
        assert_log_clean(world.log)
        assert_nothing_left(state_dir, ledger_dir)
        tally.case(outcome)

    case()
    tally.finish()
