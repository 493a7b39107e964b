"""The per-host service: hotplug runs share one Python, one cluster connection.

Every in-process hotplug run pays its own interpreter start, imports, cephx
handshake and connection threads (~0.4 CPU-s and ~50 MB each); a boot storm of
a hundred disks cannot afford that.  The service pays them once: the hotplug
script (scripts/block-rbd) sends its run here over a root-only Unix socket and
waits for the exit code; the service runs the very same hotplug.run() in a
thread with its shared connection.  When nothing answers in time the script
does the run itself, so a run behaves the same with or without the service.

It never holds the guests' disks: mappings live in the kernel, in rbd-nbd and
rbd-fuse daemons (each in a scope unit of its own under systemd) and in the
records under state_dir, all of which outlive a stop or crash of the service.

Wire protocol (PROTOCOL), fields separated by NUL, messages by newline:
  script:  "block-rbd" PROTOCOL command path started config xenstored
  service: "ready" | "decline" reason        (at once)
  script:  "go"                              (only then does the run start)
  service: "done" exit-code stderr-line...   (when the run ends, or once its
                                             failure is in xenstore)
A script that gave up waiting for "ready" sends nothing and closes: the
service then drops the request, so a run never happens twice.
"""

import contextvars
import logging
import os
import signal
import socket
import struct
import threading
import time

from . import config as config_mod
from . import deadline, hotplug
from . import log as log_mod
from . import process
from .cluster import Cluster
from .errors import BlockRbdError, HotplugTimeout

log = logging.getLogger("block-rbd")

SOCKET = "/run/block-rbd/hotplug.sock"
ENV_SOCKET = "BLOCK_RBD_SOCKET"
PROTOCOL = "1"
SD_LISTEN_FDS_START = 3
IDLE = 120  # seconds without a request before the service exits (systemd starts it again on demand)
# Runs at once; the others wait their turn (their budgets keep counting).  A boot storm of
# hundreds gains nothing from more on a dom0 of a few vCPUs, and each costs memory.
WORKERS = 32
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def encode(*fields):
    return ("\0".join(str(f) for f in fields) + "\n").encode()


def read_message(sock, buffer, limit=65536):
    """(fields of the next message, rest of the buffer); None fields at EOF."""
    while b"\n" not in buffer:
        chunk = sock.recv(4096)
        if not chunk:
            return None, buffer
        buffer += chunk
        if len(buffer) > limit:
            raise ValueError("message too long")
    line, _, rest = buffer.partition(b"\n")
    return line.decode(errors="replace").split("\0"), rest


class _Capture(logging.Handler):
    """What a run would have printed on its own stderr, for the script to print."""

    def __init__(self):
        super().__init__(logging.WARNING)
        # a context variable, not a thread's: a run's watchdog thread runs in its context
        self.lines = contextvars.ContextVar("block_rbd_run_lines", default=None)
        self.setFormatter(logging.Formatter("block-rbd: %(where)s%(message)s"))

    def emit(self, record):
        lines = self.lines.get()
        if lines is not None:
            lines.append(self.format(record))


class Service:
    def __init__(self, listener, idle=IDLE):
        self.listener = listener
        self.idle = idle
        self.config_path = os.environ.get(config_mod.ENV_VAR) or config_mod.DEFAULT_PATH
        self.config = config_mod.load()
        self.cluster = Cluster(self.config)
        self.busy = 0
        self.last = time.monotonic()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.capture = _Capture()
        self.workers = threading.BoundedSemaphore(WORKERS)

    def serve(self):
        log.addHandler(self.capture)
        self.listener.settimeout(1.0)
        log.info("serving hotplug runs on %s (pid %d)", _name(self.listener), os.getpid())
        try:
            while not self.stopping.is_set():
                try:
                    conn, _addr = self.listener.accept()
                except socket.timeout:
                    with self.lock:
                        if self.busy == 0 and time.monotonic() - self.last > self.idle:
                            log.info("idle for %d s; exiting", self.idle)
                            break
                    continue
                except InterruptedError:
                    continue
                with self.lock:
                    self.busy += 1
                    self.last = time.monotonic()
                threading.Thread(target=self._handle, args=(conn,), daemon=True).start()
        finally:
            self._drain()
            self.cluster.close()

    def stop(self, *_args):
        self.stopping.set()

    def _drain(self):
        """Let runs in flight finish (each is bounded by its own budget)."""
        def idle():
            with self.lock:
                return self.busy == 0

        try:
            deadline.retry(idle, what="runs in flight", cap=deadline.LIBXL_KILL, interval=0.05, max_interval=0.05,
                           give_up=lambda waited: HotplugTimeout("%d run(s) still going after %.0f s"
                                                                  % (self.busy, waited)))
        except HotplugTimeout as exc:
            log.error("stopping anyway: %s", exc)

    def _handle(self, conn):
        try:
            with conn:
                conn.settimeout(deadline.LIBXL_KILL)
                self._converse(conn)
        except (OSError, ValueError) as exc:
            log.warning("a request ended early: %s", exc)
        finally:
            with self.lock:
                self.busy -= 1
                self.last = time.monotonic()

    def _converse(self, conn):
        _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid not in (0, os.geteuid()):
            log.warning("refused a request from uid %d", uid)
            return
        fields, rest = read_message(conn, b"")
        if fields is None:
            return  # connected and left (a probe)
        if len(fields) != 7 or fields[:2] != ["block-rbd", PROTOCOL]:
            conn.sendall(encode("decline", "protocol"))
            return
        _magic, _version, command, path, started, config_path, xenstored = fields
        if command not in ("add", "remove") or not path.startswith("backend/"):
            conn.sendall(encode("decline", "bad request"))
            return
        if config_path != self.config_path:
            # Another configuration than ours: the script runs in-process, with its own.
            conn.sendall(encode("decline", "configuration %s is not the service's" % config_path))
            return
        conn.sendall(encode("ready"))
        go, _rest = read_message(conn, rest)
        if go != ["go"]:
            return  # the script gave up on us and runs in-process
        env = dict(os.environ, XENSTORED_PATH=xenstored) if xenstored else None
        lines = []
        token = self.capture.lines.set(lines)
        sent = []
        send_lock = threading.Lock()

        def done(code):
            # once: when a failure is in xenstore (the script may exit then), else at the end
            with send_lock:
                if sent:
                    return
                sent.append(code)
                try:
                    conn.sendall(encode("done", code, *lines))
                except OSError as exc:
                    log.warning("the script left before the run's end: %s", exc)

        try:
            with self.workers:
                code = hotplug.run(command, path, float(started), cluster=self.cluster, xs_env=env,
                                   own_logging=False, on_reported=done)
        finally:
            self.capture.lines.reset(token)
        done(code)


def _name(listener):
    try:
        return listener.getsockname() or "a socket from systemd"
    except OSError:
        return "a socket from systemd"


def listener_from_systemd():
    """The socket systemd passed us (socket activation), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    return socket.socket(fileno=SD_LISTEN_FDS_START)


def bind(path):
    """Our own listening socket at `path`, root-only (where no systemd starts us)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(256)
    return listener


def main(socket_path=None, idle=IDLE):
    """`block-rbd service`: serve until idle or SIGTERM.  Returns the exit code."""
    process.fix_path()
    config = config_mod.load()
    log_mod.set_context("service")
    log_mod.setup(config["log.file"], config["log.syslog"], config["log.verbose"], stderr_level=logging.INFO)
    listener = listener_from_systemd()
    if listener is None:
        listener = bind(socket_path or os.environ.get(ENV_SOCKET) or SOCKET)
    try:
        service = Service(listener, idle)
    except BlockRbdError as exc:
        log.error("%s", exc)
        return 1
    signal.signal(signal.SIGTERM, service.stop)
    signal.signal(signal.SIGINT, service.stop)
    service.serve()
    listener.close()
    return 0
