"""Fuzz (b): xenstored's replies, against the real client (block_rbd/xenstore.py) over a Unix
socket.  A scripted daemon answers each request as the case says: truncated, oversized
(the length field or the body), of another type, request id or transaction, watch events
before the reply, garbage, dribbled a few bytes at a time; then, its script over, it closes
the connection or (now and then) goes silent.

Each case must end in a result of the call's type or a XenstoreError (a subclass) of one
line, and within the request's time cap: at most CAP for each request the daemon saw (and
one more, cut short), never more.
"""

import os
import shutil
import socket
import tempfile
import threading
import time

import pytest
from hypothesis import given, note, seed

from block_rbd import xenstore as xs_mod
from block_rbd.errors import XenstoreError
from block_rbd.xenstore import Xenstore
from fuzzkit import SETTINGS, Genome, genomes, fuzzer  # noqa: F401 (fuzzer: a fixture)

SEED = 2603
CAP = 0.1        # each request's time cap (Xenstore(timeout=...)): short, so that 10,000 cases stay fast
SLACK = 3.0      # a loaded 2-core host schedules threads late (CI: 10,000 cases beside other suites)
# A script that ends in "close" closes the connection after an answer the client may wait on
# for more (a cut, a length field not its body's, a watch event last).  One that
# ends "silent" (about one in a hundred) leaves the client to its time cap.
BASE = "/local/domain/0/backend/vbd/5/51712"
ERRNOS = [b"ENOENT", b"EAGAIN", b"E2BIG", b"EACCES", b"EINVAL", b"EQUOTA", b"", b"ENOENT\0junk", b"\xff\xfe"]
TYPES = [xs_mod.XS_DIRECTORY, xs_mod.XS_READ, xs_mod.XS_TRANSACTION_START, xs_mod.XS_TRANSACTION_END,
         xs_mod.XS_WRITE, xs_mod.XS_ERROR, xs_mod.XS_WATCH_EVENT, xs_mod.XS_DIRECTORY_PART, 0, 3, 99, 0xFFFFFFFF]


# ---- the script: what the daemon answers, request by request -------------------------------

def plan_message(g):
    """One message of an answer: how its header and body are made from the request's."""
    return {
        "type": g.pick(["echo"] * 6 + ["error", "watch", "other"]),
        "other": g.pick(TYPES),
        "req": g.pick(["echo"] * 6 + ["next", "zero", "any"]),
        "tx": g.pick(["echo"] * 6 + ["zero", "next", "any"]),
        "any": int.from_bytes(g.raw(4), "big"),
        "body": g.pick(["proper"] * 5 + ["raw", "huge", "digits", "empty"]),
        "raw": g.raw(24),
        "errno": g.pick(ERRNOS),
        "value": g.text(10).encode("utf-8", "surrogatepass"),
        "names": [g.text(6).encode("utf-8", "surrogatepass") for _ in range(g.below(4))],
        "tx_id": g.pick([b"7", b"1", b"0", b"-1", b" 7", b"4294967295", b"4294967296", b"1_0", b"\xd9\xa3",
                         b"99999999999999999999999"]),
        "length": g.pick(["actual"] * 6 + ["more", "less", "max", "huge"]),
        "delta": 1 + g.below(8),
        "cut": g.pick([None] * 10 + ["header", "body"]),
        "cut_at": g.below(64),
    }


def plan(g):
    """The daemon's script: a list of answers (each a list of messages, how it is sent), then the end."""
    answers = []
    for _ in range(g.below(9)):
        messages = [plan_message(g) for _ in range(1 + (g.below(4) if g.one_in(6) else 0))]
        dribble = g.one_in(6)
        answers.append({"messages": messages, "dribble": dribble, "piece": 1 + g.below(5),
                        "pause": dribble and g.one_in(4)})
    return {"answers": answers, "end": "silent" if g.one_in(100) else "close",
            "call": g.pick(["read", "directory", "ls", "write", "exists", "write-one"])}


def proper_body(mtype, m):
    if m["type"] == "error":
        return m["errno"] + b"\0"
    if m["type"] == "watch":
        return BASE.encode() + b"/a\0token\0"
    if mtype == xs_mod.XS_READ:
        return m["value"]
    if mtype == xs_mod.XS_DIRECTORY:
        return b"".join(name + b"\0" for name in m["names"])
    if mtype == xs_mod.XS_DIRECTORY_PART:
        return b"5\0" + b"".join(name + b"\0" for name in m["names"]) + b"\0"
    if mtype == xs_mod.XS_TRANSACTION_START:
        return m["tx_id"] + b"\0"
    return b"OK\0"


def render(m, mtype, req, tx):
    """The bytes of message plan `m` answering request (mtype, req, tx)."""
    rtype = {"echo": mtype, "error": xs_mod.XS_ERROR, "watch": xs_mod.XS_WATCH_EVENT}.get(m["type"], m["other"])
    rreq = {"echo": req, "next": (req + 1) & 0xFFFFFFFF, "zero": 0}.get(m["req"], m["any"])
    rtx = {"echo": tx, "zero": 0, "next": (tx + 1) & 0xFFFFFFFF}.get(m["tx"], m["any"])
    body = {"proper": None, "raw": m["raw"], "huge": b"x" * (xs_mod.PAYLOAD_MAX + 1), "empty": b"",
            "digits": m["tx_id"] + b"\0"}[m["body"]]
    if body is None:
        body = proper_body(mtype, m)
    size = {"actual": len(body), "more": len(body) + m["delta"], "less": max(0, len(body) - m["delta"]),
            "max": xs_mod.PAYLOAD_MAX + m["delta"], "huge": 0xFFFFFFFF}[m["length"]]
    data = xs_mod.HEADER.pack(rtype, rreq, rtx, size) + body
    if m["cut"] == "header":
        data = data[:m["cut_at"] % xs_mod.HEADER.size]
    elif m["cut"] == "body":
        data = data[:xs_mod.HEADER.size + m["cut_at"] % (len(body) + 1)]
    return data


def complete(answer):
    """Whether an answer leaves the client nothing to wait for: whole messages, the last no
    watch event (the client sets that aside and waits on)."""
    return (all(m["cut"] is None and m["length"] == "actual" for m in answer["messages"])
            and answer["messages"][-1]["type"] != "watch")


# ---- the daemon --------------------------------------------------------------------------

class Case:
    """One case's script, as the daemon plays it: `seen` counts the requests it read."""

    def __init__(self, script):
        self.script = script
        self.answers = list(script["answers"])
        self.seen = 0
        self.over = threading.Event()  # the case has ended: a silent daemon may close now


class Daemon:
    """One listening socket for every case; each connection plays the case current when it came."""

    def __init__(self, path):
        self.path = path
        self.case = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.threads = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn, self.case), daemon=True)
            thread.start()

    @staticmethod
    def _exactly(conn, size):
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def _serve(self, conn, case):
        try:
            while True:
                mtype, req, tx, size = xs_mod.HEADER.unpack(self._exactly(conn, xs_mod.HEADER.size))
                if size:
                    self._exactly(conn, size)
                case.seen += 1
                if not case.answers:
                    if case.script["end"] == "silent":
                        case.over.wait(5)
                    return
                answer = case.answers.pop(0)
                data = b"".join(render(m, mtype, req, tx) for m in answer["messages"])
                if not answer["dribble"]:
                    conn.sendall(data)
                else:
                    for at in range(0, len(data), answer["piece"]):
                        conn.sendall(data[at:at + answer["piece"]])
                        if answer["pause"]:
                            time.sleep(0.0005)
                if case.script["end"] == "close" and not complete(answer):
                    return  # the client may wait for bytes that will not come: closed, not silent
        except OSError:
            pass
        finally:
            conn.close()

    def stop(self):
        self.listener.close()


@pytest.fixture
def daemon():
    directory = tempfile.mkdtemp(prefix="xsfz")  # short: Unix socket paths are limited
    made = Daemon(os.path.join(directory, "sock"))
    yield made
    made.stop()
    shutil.rmtree(directory, ignore_errors=True)


CALLS = {
    "read": (lambda xs: xs.read_optional(BASE + "/a"), (str, type(None))),
    "exists": (lambda xs: xs.exists(BASE + "/a"), (bool,)),
    "directory": (lambda xs: xs.directory(BASE), (list, type(None))),
    "ls": (lambda xs: xs.ls(BASE), (dict,)),
    "write": (lambda xs: xs.write({BASE + "/a": "1", BASE + "/b": "two"}), (type(None),)),
    "write-one": (lambda xs: xs.write({BASE + "/hotplug-error": "x" * 100}), (type(None),)),
}


def test_fuzz_xenstored_replies(daemon, fuzzer):
    tally = fuzzer("xenstored replies (b)", SEED)

    @seed(SEED)
    @SETTINGS
    @given(genomes())
    def case(genome):
        script = plan(Genome(genome))
        note(repr(script))
        current = daemon.case = Case(script)
        call, kinds = CALLS[script["call"]]
        xs = Xenstore(env={"XENSTORED_PATH": daemon.path}, timeout=CAP)
        started = time.monotonic()
        try:
            got = call(xs)
        except XenstoreError as exc:
            message = str(exc)
            outcome = type(exc).__name__ + (" (timed out)" if "timed out" in message else "")
            assert message and len(message.splitlines()) == 1, message
        else:
            outcome = "result"
            assert isinstance(got, kinds), got
        finally:
            elapsed = time.monotonic() - started
            current.over.set()
            xs.close()
        assert elapsed <= CAP * (current.seen + 1) + SLACK, (elapsed, current.seen)
        tally.case(outcome)

    case()
    tally.finish()
