"""The xenstore seam (block_rbd/xenstore.py): the wire protocol against the xenstored
double here and the real xenstored in the Xen gate's dom0, each result checked with
Debian's REAL xenstore-* tools (what libxl and Xen's own scripts use)."""

import os
import subprocess

import pytest

from block_rbd import xenstore as xs_mod
from block_rbd.errors import XenstoreError
from block_rbd.xenstore import Xenstore, daemon_paths
from conftest import IN_DOM0
from xstools import parse_ls, unescape

BASE = "/local/domain/0/backend/vbd/5/51712"

# Values a backend may hold; the tools escape some of them on output.
AWKWARD = [
    "plain",
    "with spaces  inside ",
    "a,b,c",
    "back\\slash",
    "two\\\\slashes",
    "tab\there",
    "quote\"d",
    "equals = sign",
    "rbd/ns/img@snap,mode=r!,mapper=fuse",
    "caf\u00e9 d\u00e9j\u00e0 \u2603",
    "ctl\x01\x07\x08\x0b\x1b\x7f",
    "x" * 1500,
    "",
]


# ---- reading the tools' output (the cross-checks below) ------------------------------------

@pytest.mark.parametrize("escaped, value", [
    ("plain", "plain"),
    ("back\\\\slash", "back\\slash"),
    ("tab\\there", "tab\there"),
    ("nl\\nhere", "nl\nhere"),
    ("oct\\001al", "oct\x01al"),
    ("quote\\\"d", "quote\"d"),
    ("\\\\\\\\", "\\\\"),
    ("caf\\xc3\\xa9", "caf\u00e9"),          # libxenstore: bytes >= 010 as \\xhh ...
    ("\\x0b\\x7f\\x1B", "\x0b\x7f\x1b"),
    ("\\001\\007", "\x01\x07"),             # ... and below 010 as \\ooo
])
def test_unescape(escaped, value):
    assert unescape(escaped) == value


def test_parse_ls_relative_keys_and_escapes():
    output = "\n".join([
        '/local/domain/0/backend/vbd/5/51712 = ""',
        '/local/domain/0/backend/vbd/5/51712/params = "rbd:vm1,mode=r"',
        '/local/domain/0/backend/vbd/5/51712/sub = ""',
        '/local/domain/0/backend/vbd/5/51712/sub/key = "a b \\\\ c"',
        '/local/domain/0/backend/vbd/5/517120/other = "not below"',
        '/local/domain/0/backend/vbd/5/51712/perms = "x"  (n0)',  # -p output: not a plain value line
        'garbage line',
    ])
    assert parse_ls(output, BASE + "/") == {"params": "rbd:vm1,mode=r", "sub": "", "sub/key": "a b \\ c"}


# ---- where it connects ---------------------------------------------------------------------

def test_daemon_paths_are_libxenstores():
    assert daemon_paths({}) == ["/var/run/xenstored/socket", "/dev/xen/xenbus"]
    assert daemon_paths({"XENSTORED_RUNDIR": "/run/xs"}) == ["/run/xs/socket", "/dev/xen/xenbus"]
    assert daemon_paths({"XENSTORED_PATH": "/tmp/s", "XENSTORED_RUNDIR": "/run/xs"}) == ["/tmp/s"]


# ---- against the daemon, checked with the real tools ---------------------------------------

def tool(*argv):
    """A real xenstore-* tool, pointed where the fixture points block-rbd (env)."""
    env = dict(os.environ, PATH="/usr/sbin:/usr/bin:/sbin:/bin")
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, env=env)


@pytest.fixture
def xs(xenstored):
    client = Xenstore(timeout=10)
    yield client
    client.close()


def test_relative_paths_are_dom0s_home(xs, xenstored):
    xenstored.write(BASE + "/params", "rbd:vm1")
    assert xs.read_optional("backend/vbd/5/51712/params") == "rbd:vm1"
    assert xs.ls("backend/vbd/5/51712") == {"params": "rbd:vm1"}


def test_read_optional(xs, xenstored):
    assert xs.read_optional(BASE + "/nope") is None
    assert xs.read_optional("/local/domain/12345/nope") is None  # no parent either
    xenstored.write(BASE + "/v", "with spaces")
    assert xs.read_optional(BASE + "/v") == "with spaces"
    xenstored.write(BASE + "/empty", "")
    assert xs.read_optional(BASE + "/empty") == ""


@pytest.mark.parametrize("value", AWKWARD)
def test_raw_writes_round_trip(xs, xenstored, value):
    """Values are stored verbatim, byte for byte what `xenstore-write -R` stores."""
    xs.write({BASE + "/value": value})
    assert xenstored.read(BASE + "/value") == value
    assert xs.read_optional(BASE + "/value") == value
    assert xs.ls(BASE) == {"value": value}
    listed = tool("xenstore-ls", "-f", BASE)
    assert parse_ls(listed.stdout, BASE) == {"value": value}
    xenstored.write(BASE + "/value", "")
    assert tool("xenstore-write", "-R", BASE + "/value", value).returncode == 0
    assert xs.read_optional(BASE + "/value") == value


def test_multi_key_write_is_one_transaction(xs, xenstored, mocker):
    spy = mocker.spy(xs, "_request")
    pairs = {BASE + "/physical-device": "7:0", BASE + "/physical-device-path": "/dev/loop0",
             BASE + "/block-rbd-image": "rbd/vm 1,x\\y"}
    xs.write(pairs)
    calls = [(c.args[0], c.args[2] if len(c.args) > 2 else 0) for c in spy.call_args_list]
    tx = calls[1][1]
    assert tx != 0
    assert calls == [(xs_mod.XS_TRANSACTION_START, 0)] + [(xs_mod.XS_WRITE, tx)] * 3 \
        + [(xs_mod.XS_TRANSACTION_END, tx)]
    for path, value in pairs.items():
        assert xenstored.read(path) == value
        assert tool("xenstore-read", "-R", path).stdout == value


def test_a_conflicting_commit_is_retried(xs, xenstored, mocker):
    real = xs._request
    conflicts = []

    def request(mtype, payload, tx=0, what="xenstore"):
        if mtype == xs_mod.XS_TRANSACTION_END and payload == b"T\0" and not conflicts:
            conflicts.append(tx)
            real(mtype, b"F\0", tx, what)  # the daemon drops it, as after a conflict
            raise xs_mod.XenstoreRefused("EAGAIN", what)
        return real(mtype, payload, tx, what)
    mocker.patch.object(xs, "_request", side_effect=request)
    xs.write({BASE + "/a": "1", BASE + "/b": "2"})
    assert conflicts and xenstored.read(BASE + "/a") == "1" and xenstored.read(BASE + "/b") == "2"


def test_ls_reads_every_node_below(xs, xenstored):
    for i, value in enumerate(AWKWARD):
        xenstored.write("%s/k%d" % (BASE, i), value)
    xenstored.write(BASE + "/dir/deep", "x, y")
    xenstored.write(BASE + "0/sibling", "must not appear")
    got = xs.ls(BASE)
    expected = {"k%d" % i: value for i, value in enumerate(AWKWARD)}
    expected.update({"dir": "", "dir/deep": "x, y"})
    assert got == expected
    assert parse_ls(tool("xenstore-ls", "-f", BASE).stdout, BASE) == expected


def test_a_directory_longer_than_one_reply_is_read_in_parts(xs, xenstored):
    """XS_DIRECTORY answers E2BIG past 4096 bytes; XS_DIRECTORY_PART reads it (as libxenstore)."""
    names = ["child-%03d-%s" % (i, "n" * 20) for i in range(200)]  # 6 KiB of names
    xs.write({"%s/many/%s" % (BASE, n): str(i) for i, n in enumerate(names)})
    assert xs.directory(BASE + "/many") == names
    assert xs.ls(BASE + "/many") == {n: str(i) for i, n in enumerate(names)}


def test_ls_of_a_missing_path_is_empty(xs):
    assert xs.ls(BASE + "/nothing") == {}
    assert xs.directory(BASE + "/nothing") is None


def test_exists(xs, xenstored):
    assert not xs.exists(BASE + "/x")
    xenstored.write(BASE + "/x", "")
    assert xs.exists(BASE + "/x")


def test_unreachable_daemon_is_a_one_line_error(tmp_path):
    xs = Xenstore(env={"XENSTORED_PATH": str(tmp_path / "no-socket")}, timeout=5)
    for call in (lambda: xs.read_optional(BASE + "/params"), lambda: xs.ls(BASE),
                 lambda: xs.write({BASE + "/x": "1"})):
        with pytest.raises(XenstoreError) as info:
            call()
        assert str(info.value) == "cannot reach xenstored (%s: No such file or directory)" % (
            tmp_path / "no-socket")


@pytest.mark.skipif(IN_DOM0, reason="the double's delay: the real xenstored answers at once")
def test_a_request_that_times_out_leaves_no_stale_reply(xenstored):
    xenstored.write(BASE + "/a", "first")
    xenstored.write(BASE + "/b", "second")
    xs = Xenstore(timeout=0.3)
    xenstored.delay = 1.0
    try:
        with pytest.raises(XenstoreError, match=r"^xenstore read %s/a: timed out after 0 s$" % BASE):
            xs.read_optional(BASE + "/a")
    finally:
        xenstored.delay = 0
    assert xs.read_optional(BASE + "/b") == "second"  # a new connection: not the late "first"
    xs.close()


def test_env_says_where_the_daemon_is(xenstored, tmp_path, monkeypatch):
    env = dict(os.environ)
    monkeypatch.setenv("XENSTORED_PATH", str(tmp_path / "elsewhere"))
    xs = Xenstore(env=env)
    xs.write({BASE + "/x": "1"})
    assert xenstored.read(BASE + "/x") == "1"
    xs.close()


def test_each_thread_has_its_own_connection(xs, xenstored):
    import threading
    xenstored.write(BASE + "/x", "1")
    assert xs.read_optional(BASE + "/x") == "1"
    seen = []
    thread = threading.Thread(target=lambda: seen.append(xs.read_optional(BASE + "/x")))
    thread.start()
    thread.join()
    assert seen == ["1"] and len(xs._links) == 2
    xs.close()
    assert xs._links == {}


@pytest.mark.skipif(not IN_DOM0 or not os.path.exists("/dev/xen/xenbus"),
                    reason="needs a Xen dom0's /dev/xen/xenbus (the Xen gate's pytest-dom0 runs this)")
def test_the_xenbus_device_speaks_the_same_protocol(xenstored):
    """xenstored in a stub domain leaves only the kernel's device: libxenstore's last resort."""
    xs = Xenstore(env={"XENSTORED_PATH": "/dev/xen/xenbus"}, timeout=10)
    xs.write({BASE + "/dev-a": "via xenbus", BASE + "/dev-b": "two"})
    assert xs.read_optional(BASE + "/dev-a") == "via xenbus"
    assert xs.ls(BASE) == {"dev-a": "via xenbus", "dev-b": "two"}
    assert xs.read_optional(BASE + "/nope") is None
    assert xenstored.read(BASE + "/dev-b") == "two"
    xs.close()
