"""xenstore over its wire protocol (xen/include/public/io/xs_wire.h), in-process.

Debian ships no Python bindings for xenstore.  The xenstore-* tools cost a process
each, and under a boot storm on a loaded dom0 one of them took seconds; an add made
five or six.  A run now holds one connection and sends the requests itself, to the
same place libxenstore's xs_open() goes: $XENSTORED_PATH, else the daemon's socket
($XENSTORED_RUNDIR, default /var/run/xenstored), else the kernel's xenbus device
(xenstored in a stub domain).  Several keys written together are one transaction,
retried on EAGAIN as xenstore-write does.

A request has one end time, whatever the daemon sends meanwhile, and a reply must
answer it: its type (or XS_ERROR), request id and transaction id are the request's,
as xenstored and the xenbus device echo them.  A watch event may come between a
request and its reply; it is set aside.  Nothing over XENSTORE_PAYLOAD_MAX is sent:
xenstored drops the connection, and with it what the run meant to say (fit()).
"""

import collections
import errno
import os
import select
import socket
import stat
import struct
import threading
import time

from . import deadline
from .errors import XenstoreError, XenstoreProtocolError, XenstoreRefused

XS_DIRECTORY = 1
XS_READ = 2
XS_TRANSACTION_START = 6
XS_TRANSACTION_END = 7
XS_WRITE = 11
XS_WATCH_EVENT = 15
XS_ERROR = 16
XS_DIRECTORY_PART = 22
HEADER = struct.Struct("=IIII")  # type, req_id, tx_id, len: host byte order, as xs_wire.h
PAYLOAD_MAX = 4096
COMMITS = 20  # EAGAIN: another writer changed what the transaction read (xenstore-write retries too)
EVENTS_KEPT = 64  # watch events set aside per connection (block-rbd sets no watch: none should come)
CUT = "\u2026"  # ends a message fit() had to cut


def fit(path, value):
    """`value`, cut to what one write of it to `path` can carry (ending in CUT), in valid
    UTF-8: for a message such as hotplug-error, which must arrive, if only in part."""
    data = str(value).encode("utf-8", "replace")
    room = PAYLOAD_MAX - len(path.encode("utf-8")) - 1
    if len(data) <= room:
        return data.decode("utf-8")
    # "ignore": a character the cut splits is left out whole
    return data[:max(0, room - len(CUT.encode("utf-8")))].decode("utf-8", "ignore") + CUT


def _too_big(what, payload):
    return XenstoreError("xenstore %s: %d bytes, more than xenstore takes in one request (%d)"
                         % (what, len(payload), PAYLOAD_MAX))


def daemon_paths(env=None):
    """Where libxenstore would connect, in its order: the daemon's socket, the xenbus device."""
    env = os.environ if env is None else env
    if env.get("XENSTORED_PATH"):
        return [env["XENSTORED_PATH"]]
    rundir = env.get("XENSTORED_RUNDIR") or "/var/run/xenstored"
    return [os.path.join(rundir, "socket"), "/dev/xen/xenbus"]


class _Link:
    """One connection: a Unix socket to xenstored, or the xenbus device."""

    def __init__(self, path, end):
        self.path = path
        self.sock = None
        self.fd = None
        self.events = collections.deque(maxlen=EVENTS_KEPT)  # watch events' payloads, oldest first
        if stat.S_ISSOCK(os.stat(path).st_mode):
            left = self._left(end)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.sock.settimeout(left)
            try:
                self.sock.connect(path)
            except OSError:
                self.sock.close()
                raise
        else:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    @staticmethod
    def _left(end):
        left = end - time.monotonic()
        if left <= 0:
            raise socket.timeout("timed out")
        return left

    def send(self, data, end):
        if self.sock is not None:
            self.sock.settimeout(self._left(end))  # sendall's timeout bounds the whole send
            self.sock.sendall(data)
        elif os.write(self.fd, data) != len(data):  # the device takes a message in one write
            raise OSError(errno.EIO, "short write to %s" % self.path)

    def receive(self, size, end):
        """`size` bytes by `end` (monotonic): each wait gets what is left, never a fresh timeout,
        so a daemon sending a byte at a time cannot keep a request alive."""
        chunks, want = [], size
        while want:
            if self.sock is not None:
                self.sock.settimeout(self._left(end))
                chunk = self.sock.recv(want)
            else:
                if not select.select([self.fd], [], [], self._left(end))[0]:
                    raise socket.timeout("timed out")
                chunk = os.read(self.fd, want)
            if not chunk:
                raise OSError(errno.ECONNRESET, "xenstored closed the connection")
            chunks.append(chunk)
            want -= len(chunk)
        return b"".join(chunks)

    def close(self):
        if self.sock is not None:
            self.sock.close()
        elif self.fd is not None:
            os.close(self.fd)


class Xenstore:
    """The xenstore seam.  `env` says where the daemon is (tests: XENSTORED_PATH).

    A request may take what is left of the run's budget: a busy dom0 makes xenstored
    slow, not wrong.  `timeout` caps one request only where it is given (outside a
    budget a wedged xenstored still ends in DEFAULT_TIMEOUT).
    """

    DEFAULT_TIMEOUT = 30

    def __init__(self, env=None, timeout=None):
        self.env = env
        self.timeout = timeout
        # A connection per thread: the watchdog's report must not queue behind a request
        # that hangs in the run's own thread.
        self._links = {}
        self._req = 0
        self._lock = threading.Lock()

    def _limit(self, what):
        return deadline.limit(self.timeout, self.DEFAULT_TIMEOUT, what)

    def _connect(self, end):
        problems = []
        for path in daemon_paths(self.env):
            try:
                return _Link(path, end)
            except OSError as exc:
                problems.append("%s: %s" % (path, exc.strerror or exc))
        raise XenstoreError("cannot reach xenstored (%s)" % "; ".join(problems))

    def _request(self, mtype, payload, tx=0, what="xenstore"):
        """The reply's payload; XenstoreError naming `what` and the daemon's error."""
        if len(payload) > PAYLOAD_MAX:
            raise _too_big(what, payload)
        seconds = self._limit(what)
        end = time.monotonic() + seconds  # the whole request: connect, send and every read
        me = threading.get_ident()
        with self._lock:
            link = self._links.get(me)
            self._req = req = (self._req + 1) & 0xFFFFFFFF
        try:
            if link is None:
                link = self._connect(end)
                with self._lock:
                    self._links[me] = link
            link.send(HEADER.pack(mtype, req, tx, len(payload)) + payload, end)
            while True:
                rtype, rreq, rtx, size = HEADER.unpack(link.receive(HEADER.size, end))
                if size > PAYLOAD_MAX:
                    raise OSError(errno.EPROTO, "a reply of %d bytes" % size)
                body = link.receive(size, end) if size else b""
                if rtype != XS_WATCH_EVENT:
                    break
                link.events.append(body)  # asynchronous, whatever its ids say: not the reply
            wrong = self._mismatch(mtype, req, tx, rtype, rreq, rtx)
            if wrong:
                raise XenstoreProtocolError("xenstore %s: %s" % (what, wrong))
        except (OSError, socket.timeout, XenstoreProtocolError) as exc:
            self._drop(me)  # a half-read or stray reply would answer the next request
            if isinstance(exc, XenstoreProtocolError):
                raise
            reason = "timed out after %.0f s" % seconds if isinstance(exc, socket.timeout) \
                else (exc.strerror or str(exc))
            raise XenstoreError("xenstore %s: %s" % (what, reason)) from None
        if rtype == XS_ERROR:
            raise XenstoreRefused(body.rstrip(b"\0").decode("ascii", "replace"), what)
        return body

    @staticmethod
    def _mismatch(mtype, req, tx, rtype, rreq, rtx):
        """What makes a reply not the request's, or None."""
        if rreq != req:
            return "a reply to request %d, not to request %d" % (rreq, req)
        if rtype not in (mtype, XS_ERROR):
            return "a reply of type %d to a request of type %d" % (rtype, mtype)
        if rtx != tx:
            return "a reply in transaction %d, not in transaction %d" % (rtx, tx)
        return None

    def _drop(self, thread):
        with self._lock:
            link = self._links.pop(thread, None)
        if link is not None:
            link.close()

    def close(self):
        """Close every thread's connection (a transaction left open is dropped with it)."""
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()

    @staticmethod
    def _path(path):
        return path.encode("utf-8") + b"\0"

    def read_optional(self, path):
        """The value at `path`, or None when it does not exist."""
        try:
            value = self._request(XS_READ, self._path(path), what="read %s" % path)
        except XenstoreRefused as exc:
            if exc.code == "ENOENT":
                return None
            raise
        return value.decode("utf-8", "replace")

    def directory(self, path):
        """The names of the children of `path`, in the daemon's order; None if it is missing."""
        try:
            try:
                body = self._request(XS_DIRECTORY, self._path(path), what="directory %s" % path)
            except XenstoreRefused as exc:
                if exc.code != "E2BIG":
                    raise
                body = self._directory_parts(path)
        except XenstoreRefused as exc:
            if exc.code == "ENOENT":
                return None
            raise
        return [name.decode("utf-8", "replace") for name in body.split(b"\0") if name]

    def _directory_parts(self, path):
        """XS_DIRECTORY_PART, as libxenstore reads a directory too long for one reply: each
        part starts with the node's generation; a changed one means start again."""
        for _attempt in range(COMMITS):
            names, offset, generation = b"", 0, None
            while True:
                body = self._request(XS_DIRECTORY_PART, self._path(path) + b"%d\0" % offset,
                                     what="directory %s" % path)
                gen, _, part = body.partition(b"\0")
                if generation is not None and gen != generation:
                    break
                generation = gen
                if part in (b"", b"\0"):  # the end: an empty string
                    return names
                names += part[:-1] if part.endswith(b"\0\0") else part
                offset = len(names)
        raise XenstoreError("xenstore directory %s: it kept changing while read" % path)

    def ls(self, path):
        """Every node below `path` as {relative path: value}; {} if `path` is missing."""
        values = {}
        pending = [""]
        while pending:
            rel = pending.pop(0)
            base = path.rstrip("/") + ("/" + rel if rel else "")
            for name in self.directory(base) or []:
                key = rel + "/" + name if rel else name
                value = self.read_optional(base + "/" + name)
                if value is None:
                    continue  # removed while we walked
                values[key] = value
                pending.append(key)
        return values

    def write(self, pairs):
        """Write {path: value} (ordered) in one transaction; values stored verbatim.

        A write too big for one request fails before anything is sent (fit() cuts a message)."""
        writes = [(path, self._path(path) + str(value).encode("utf-8")) for path, value in pairs.items()]
        for path, payload in writes:
            if len(payload) > PAYLOAD_MAX:
                raise _too_big("write %s" % path, payload)
        for _attempt in range(COMMITS):
            tx = self._transaction_start()
            try:
                for path, payload in writes:
                    self._request(XS_WRITE, payload, tx, what="write %s" % path)
            except XenstoreError:
                self._end(tx, commit=False)
                raise
            try:
                self._end(tx, commit=True)
                return
            except XenstoreRefused as exc:
                if exc.code != "EAGAIN":
                    raise
        raise XenstoreError("xenstore write of %s: the transaction kept conflicting" % ", ".join(pairs))

    def _transaction_start(self):
        body = self._request(XS_TRANSACTION_START, b"\0", what="transaction start")
        text = body.rstrip(b"\0")
        # a decimal uint32, not 0 (no transaction): int() would take " 7", "-1", "1_0"
        if not text.isdigit() or not 0 < int(text) <= 0xFFFFFFFF:
            self._drop(threading.get_ident())  # whatever the daemon opened goes with the connection
            raise XenstoreProtocolError("xenstore transaction start: the daemon answered %r, not a transaction id"
                                        % text[:40].decode("ascii", "replace"))
        return int(text)

    def _end(self, tx, commit):
        try:
            self._request(XS_TRANSACTION_END, b"T\0" if commit else b"F\0", tx, what="transaction end")
        except XenstoreRefused:
            if commit:
                raise
        except XenstoreError:
            if commit:
                raise  # an abort that fails: the daemon drops the transaction with the connection

    def exists(self, path):
        return self.read_optional(path) is not None

