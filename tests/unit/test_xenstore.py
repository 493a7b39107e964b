"""The xenstore seam (block_rbd/xenstore.py): the wire protocol against the xenstored
double here and the real xenstored in the Xen gate's dom0, each result checked with
Debian's REAL xenstore-* tools (what libxl and Xen's own scripts use)."""

import os
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from block_rbd import deadline
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


# ---- attack: a daemon that answers slowly, wrongly, or not at all --------------------------------

class Scripted:
    """A xenstored that answers each request as `answer(mtype, req_id, tx_id, payload)` says: a
    list of byte strings sent in turn, `pause` seconds before each (header: little-endian
    type, req_id, tx_id, len, as HEADER).  `seen`: every request, (type, req_id, tx_id, payload)."""

    def __init__(self, answer, pause=0.0):
        self.answer, self.pause = answer, pause
        self.seen = []
        self.dir = tempfile.mkdtemp(prefix="xss")  # short: Unix socket paths are limited
        self.path = os.path.join(self.dir, "sock")
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(8)
        self.conns = []
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _exactly(conn, size):
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def _serve(self, conn):
        try:
            while True:
                mtype, req, tx, size = xs_mod.HEADER.unpack(self._exactly(conn, xs_mod.HEADER.size))
                payload = self._exactly(conn, size) if size else b""
                self.seen.append((mtype, req, tx, payload))
                for piece in self.answer(mtype, req, tx, payload):
                    if self.stopped.wait(self.pause):
                        return
                    conn.sendall(piece)
        except OSError:
            pass

    def client(self, timeout=1):
        return Xenstore(env={"XENSTORED_PATH": self.path}, timeout=timeout)

    def stop(self):
        self.stopped.set()
        self.listener.close()
        for conn in self.conns:
            conn.close()
        os.unlink(self.path)
        os.rmdir(self.dir)


def message(mtype, req, tx, payload):
    return xs_mod.HEADER.pack(mtype, req, tx, len(payload)) + payload


@pytest.fixture
def scripted():
    made = []

    def make(answer, pause=0.0):
        made.append(Scripted(answer, pause))
        return made[-1]
    yield make
    for daemon in made:
        daemon.stop()


def reply(mtype, req, tx, payload):
    """What xenstored answers: a read's value, a transaction's id, else OK."""
    if mtype == xs_mod.XS_READ:
        return [message(mtype, req, tx, b"value")]
    if mtype == xs_mod.XS_TRANSACTION_START:
        return [message(mtype, req, tx, b"7\0")]
    return [message(mtype, req, tx, b"OK\0")]


def test_attack_a_daemon_that_dribbles_its_reply_is_cut_at_the_requests_time(scripted):
    """One byte every 0.2 s kept a 1 s request alive: every recv had 1 s again."""
    def dribble(mtype, req, tx, payload):
        whole = message(mtype, req, tx, b"v" * 20)
        return [whole[i:i + 1] for i in range(len(whole))]  # 36 bytes: 7 s
    xs = scripted(dribble, pause=0.2).client(timeout=1)
    started = time.monotonic()
    with pytest.raises(XenstoreError, match=r"^xenstore read %s/a: timed out after 1 s$" % BASE):
        xs.read_optional(BASE + "/a")
    assert 0.9 < time.monotonic() - started < 1.5
    xs.close()


def test_attack_a_dribbling_daemon_is_cut_at_the_runs_budget(scripted):
    def dribble(mtype, req, tx, payload):
        whole = message(mtype, req, tx, b"v" * 20)
        return [whole[i:i + 1] for i in range(len(whole))]
    xs = scripted(dribble, pause=0.2).client(timeout=None)
    started = time.monotonic()
    with deadline.budget(deadline.Deadline(1)):
        with pytest.raises(XenstoreError, match=r"^xenstore read %s/a: timed out after 1 s$" % BASE):
            xs.read_optional(BASE + "/a")
    assert 0.9 < time.monotonic() - started < 1.5
    xs.close()


@pytest.mark.parametrize("forged, said", [
    (lambda m, r, t: message(m, r + 1, t, b"forged"), "a reply to request %(bad)d, not to request %(req)d"),
    (lambda m, r, t: message(xs_mod.XS_DIRECTORY, r, t, b"forged\0"), "a reply of type 1 to a request of type 2"),
    (lambda m, r, t: message(m, r, t + 3, b"forged"), "a reply in transaction 3, not in transaction 0"),
    (lambda m, r, t: message(xs_mod.XS_ERROR, r + 1, t, b"EACCES\0"),
     "a reply to request %(bad)d, not to request %(req)d"),
], ids=["another-req-id", "another-type", "another-tx-id", "an-error-to-another-req-id"])
def test_attack_a_reply_that_does_not_answer_the_request_is_refused_in_one_line(scripted, forged, said):
    daemon = scripted(lambda m, r, t, p: [forged(m, r, t)] if m == xs_mod.XS_READ else reply(m, r, t, p))
    xs = daemon.client()
    with pytest.raises(XenstoreError) as info:
        xs.read_optional(BASE + "/a")
    req = daemon.seen[-1][1]
    assert str(info.value) == "xenstore read %s/a: %s" % (BASE, said % {"req": req, "bad": req + 1})
    # the connection is dropped: what it says next answers nothing of ours
    assert xs._links == {}
    xs.close()


def test_an_error_reply_to_the_request_is_the_daemons_refusal(scripted):
    xs = scripted(lambda m, r, t, p: [message(xs_mod.XS_ERROR, r, t, b"EACCES\0")]).client()
    with pytest.raises(xs_mod.XenstoreRefused, match=r"^xenstore read %s/a: EACCES$" % BASE) as info:
        xs.read_optional(BASE + "/a")
    assert info.value.code == "EACCES"
    xs.close()


def test_attack_a_watch_event_is_not_taken_for_the_reply(scripted):
    """XS_WATCH_EVENT comes whenever a watch fires, between replies: it is set aside."""
    event = message(xs_mod.XS_WATCH_EVENT, 0, 0, b"%s/a\0tok\0" % BASE.encode())

    def answer(m, r, t, p):
        if m != xs_mod.XS_READ:
            return reply(m, r, t, p)
        if p.startswith(b"%s/late" % BASE.encode()):
            return [event]  # and no reply at all
        return [event, message(xs_mod.XS_WATCH_EVENT, r, t, b"forged\0tok\0"), message(m, r, t, b"the value")]
    xs = scripted(answer).client(timeout=0.5)
    assert xs.read_optional(BASE + "/a") == "the value"
    with pytest.raises(XenstoreError, match="timed out"):
        xs.read_optional(BASE + "/late")
    xs.close()


@pytest.mark.parametrize("answer", [b"abc\0", b"\0", b"", b"0\0", b"-1\0", b"99999999999\0", b" 7\0"],
                         ids=["letters", "empty", "nothing", "zero", "negative", "past-32-bits", "a-space"])
def test_attack_a_transaction_id_that_is_no_number_is_one_line(scripted, answer):
    def daemon(m, r, t, p):
        return [message(m, r, t, answer)] if m == xs_mod.XS_TRANSACTION_START else reply(m, r, t, p)
    made = scripted(daemon)
    xs = made.client()
    with pytest.raises(XenstoreError) as info:
        xs.write({BASE + "/a": "1"})
    assert str(info.value) == "xenstore transaction start: the daemon answered %r, not a transaction id" % (
        answer.rstrip(b"\0").decode())
    assert [m for m, _r, _t, _p in made.seen] == [xs_mod.XS_TRANSACTION_START]  # nothing written
    xs.close()


def test_attack_an_oversized_write_is_refused_before_anything_is_sent(scripted):
    """Past 4096 bytes xenstored drops the connection, and with it everything after."""
    made = scripted(reply)
    xs = made.client()
    key = BASE + "/big"
    with pytest.raises(XenstoreError, match=r"^xenstore write %s: 4097 bytes, more than xenstore takes in one "
                                            r"request \(4096\)$" % key):
        xs.write({BASE + "/small": "1", key: "x" * (4096 - len(key))})
    assert made.seen == []
    xs.write({key: "x" * (4095 - len(key))})  # exactly the limit: sent
    assert len(made.seen[1][3]) == 4096


@pytest.mark.parametrize("text", ["x" * 10000, "\u00e9" * 5000, "\u2603" * 3000, "a" + "\U0001f600" * 2500],
                         ids=["ascii", "2-byte", "3-byte", "4-byte"])
def test_fit_cuts_a_message_to_one_request_in_valid_utf8(text):
    path = BASE + "/hotplug-error"
    cut = xs_mod.fit(path, text)
    data = cut.encode("utf-8")
    assert len(path.encode()) + 1 + len(data) <= xs_mod.PAYLOAD_MAX
    assert len(path.encode()) + 1 + len(data) > xs_mod.PAYLOAD_MAX - 4  # as much as fits
    assert cut.endswith("\u2026") and text.startswith(cut[:-1])
    assert xs_mod.fit(path, "short") == "short"
