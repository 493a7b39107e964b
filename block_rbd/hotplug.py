"""The libxl hotplug contract: `block-rbd add|remove` with XENBUS_PATH set.

add:    read the backend (one listing, on the run's xenstore connection) and the VM's uuid, attach, then
        write physical-device + physical-device-path (+ our private keys) in
        one transaction, then hotplug-status=connected.
remove: undo what the backend's keys (or, after a killed add, its params)
        name; local work first, so it needs the cluster only to release the
        cluster-wide registration, and a cluster that does not answer leaves
        that release pending instead of failing the remove.
failure: hotplug-error + hotplug-status=error in one transaction, one line
        in the log and on stderr, exit 1, nothing left behind.  The failure is
        reported as soon as it is known, then undone: undoing can be slow on
        an overloaded dom0, and libxl's SIGKILL must not find it unreported.
        A watchdog reports a run still going once its budget is over.

run() is one hotplug run, with one time budget for every step; main() calls
it in-process, the per-host service (service.py) in one of its threads with
its shared cluster connection.  Both behave the same.
"""

import contextvars
import logging
import os
import signal
import sys
import threading
import time

from . import attachments
from . import config as config_mod
from . import deadline
from . import log as log_mod
from . import process
from .cluster import Cluster
from .errors import BlockRbdError, HotplugTimeout, TargetError
from .mappers.base import device_numbers
from .policy import Request
from .registry import Registry
from .target import effective_mode, parse, parse_spec, read_only
from .xenstore import Xenstore, fit

log = logging.getLogger("block-rbd")

# Private backend keys: what `remove` needs, never a secret (the guest can read them).
KEY_IMAGE = "block-rbd-image"
KEY_MODE = "block-rbd-mode"
KEY_MAPPER = "block-rbd-mapper"
# libxl's name for a domain `xl migrate-receive` is restoring (xl_migrate.c)
MIGRATION_SUFFIX = "--incoming"


class Backend:
    """One vbd backend directory, e.g. backend/vbd/5/51712 (relative to dom0's home)."""

    def __init__(self, xs, path):
        self.xs = xs
        self.path = path.rstrip("/")
        parts = self.path.split("/")
        self.devid = parts[-1]

    def key(self, name):
        return "%s/%s" % (self.path, name)

    def read(self):
        return self.xs.ls(self.path)

    def vm_uuid(self, frontend_id):
        """The frontend domain's VM uuid (what `same VM` means across hosts)."""
        vm = self.xs.read_optional("/local/domain/%s/vm" % frontend_id)
        return vm.rsplit("/", 1)[-1] if vm else None

    def incoming(self, frontend_id):
        """Whether the frontend domain is an incoming live migration: `xl migrate-receive`
        names it NAME--incoming until the migration completes (then renames it)."""
        name = self.xs.read_optional("/local/domain/%s/name" % frontend_id)
        return bool(name) and name.endswith(MIGRATION_SUFFIX)

    def connected(self, mapping, mode):
        major, minor = device_numbers(mapping.device)
        keys = {
            self.key("physical-device"): "%x:%x" % (major, minor),
            self.key("physical-device-path"): mapping.device,
            self.key(KEY_IMAGE): str(mapping.spec),
            self.key(KEY_MODE): mode,
            self.key(KEY_MAPPER): mapping.mapper,
        }
        if mapping.read_only or mapping.mapper == "fuse":
            # blkback offers discard when the device has it, read-only or not; libxl
            # turns it off for its own `r` disks only, not for mode=r! or a snapshot.
            # A loop device on rbd-fuse offers it too, but rbd-fuse implements no
            # fallocate: each discard would fail ("operation not supported").
            keys[self.key("discard-enable")] = "0"
        self.xs.write(keys)
        self.xs.write({self.key("hotplug-status"): "connected"})

    def failed(self, message):
        # Cut to what one request carries: a longer write loses the error and the status with it.
        error = self.key("hotplug-error")
        self.xs.write({error: fit(error, message), self.key("hotplug-status"): "error"})


def add(config, backend, cluster, outcome=None, failing=None):
    """`outcome` (an Outcome) must let the run connect; `failing(exc)` is told of a
    failure before the partial attach is undone."""
    started = time.monotonic()
    keys = backend.read()
    if "physical-device" in keys:
        log.info("add: already connected to %s; nothing to do", keys.get("physical-device-path"))
        return
    if "params" not in keys:
        raise TargetError("no params in %s: is this a block-rbd disk?" % backend.path)
    target = parse(keys["params"], config["pool"])
    mode = effective_mode(target, keys.get("mode", "r"))
    frontend = keys.get("frontend-id", "")
    guest = frontend not in ("", "0")
    request = Request(holder=backend.path, mode=mode, vm=backend.vm_uuid(frontend) if guest else None,
                      domid=frontend or None, devid=backend.devid,
                      incoming=guest and backend.incoming(frontend))

    def publish(mapping):
        if outcome is not None and not outcome.take(outcome.RUN):
            raise HotplugTimeout("the run was already reported failed (its budget was over) before it "
                                 "could connect")
        backend.connected(mapping, mode)

    mapping = attachments.attach(config, cluster, target, request, Registry(config), publish=publish,
                                 failing=failing)
    log.info("add: %s mode %s -> %s via %s in %.2f s", target.spec, mode, mapping.device,
             mapping.mapper, time.monotonic() - started)


def remove(config, backend, cluster):
    keys = backend.read()
    if KEY_IMAGE in keys and KEY_MODE in keys:
        spec, mode = parse_spec(keys[KEY_IMAGE]), keys[KEY_MODE]
    else:
        # add never finished: its params still say what it may have mapped.
        try:
            target = parse(keys.get("params", ""), config["pool"])
            mode = effective_mode(target, keys.get("mode", "r"))
        except TargetError:
            log.info("remove: nothing was mapped (params %r)", keys.get("params"))
            return
        spec = target.spec
    done = attachments.detach(config, cluster, spec, read_only(mode), backend.path, Registry(config))
    log.info("remove: %s mode %s: %s", spec, mode, done)


def _finish_pending(config, cluster):
    """Complete earlier runs' pending releases, when this run reached the cluster anyway."""
    if not cluster.connected or not attachments.local_state(config).pending():
        return
    try:
        done, left = attachments.release_pending(config, cluster, Registry(config))
    except BlockRbdError as exc:
        log.warning("pending cluster-wide releases not completed: %s", exc)
        return
    if left:
        log.warning("%d cluster-wide release(s) still pending", len(left))


class Outcome:
    """Who tells libxl how a run ended, decided once: the run itself (it connects, or
    reports its failure) or its watchdog (the run outlasted its budget)."""

    RUN = "run"
    WATCHDOG = "watchdog"

    def __init__(self):
        self._lock = threading.Lock()
        self._owner = None
        self.reported = False
        self.written = threading.Event()  # the report is over (written or not)

    def take(self, who):
        """True if `who` owns the outcome (now, or already)."""
        with self._lock:
            if self._owner is None:
                self._owner = who
            return self._owner == who

    def to_report(self, who):
        """True once: for the owner's one failure report."""
        with self._lock:
            if self._owner is None:
                self._owner = who
            if self._owner != who or self.reported:
                return False
            self.reported = True
            return True


def _describe(exc):
    if isinstance(exc, BlockRbdError):
        return str(exc)
    return "internal error: %s: %s" % (type(exc).__name__, " ".join(str(exc).split()))


def _public(exc):
    """What hotplug-error may say of `exc`: the frontend reads that key, so a refusal
    names the other attachment's host and domid there, and its VM and Ceph client only
    in the log (errors.AccessRefused)."""
    return getattr(exc, "public", None) or _describe(exc)


# The watchdog is for a step that hangs: a run that begins with its budget already
# spent (a slow start) is left this long to say so itself, naming where it stood.
WATCHDOG_GRACE = 2.0


def _watchdog_delay(hotplug_budget, started, now):
    """Seconds from `now` until a run still going is reported failed: a second after its
    budget, not sooner than WATCHDOG_GRACE, early enough for the report to land before
    REPORT_END."""
    at = max(started + hotplug_budget + 1.0, now + WATCHDOG_GRACE)
    return max(0.0, min(at, started + deadline.REPORT_END - 3.0) - now)


def run(command, path, started=None, cluster=None, xs_env=None, own_logging=True, before_report=None,
        on_reported=None):
    """One hotplug run for backend `path`; returns the exit code.

    `started`: when the run began (CLOCK_MONOTONIC), for its budget.
    `cluster`: a shared connection (the service's), else one of our own.
    own_logging: set up the log handlers from the configuration (in-process);
    the service has set up its own.  before_report: called once the work is
    over, before a failure is reported (in-process: disarm the alarm, so it
    never cuts the report short).  on_reported(code): called once a failure
    is in xenstore, possibly before the run is over (the service: the script
    may exit then; what is left to undo is finished here, and libxl's remove
    waits for it on the image's lock).
    """
    started = time.monotonic() if started is None else started
    log_mod.set_context(path)
    xs = Xenstore(env=xs_env)
    backend = Backend(xs, path)
    outcome = Outcome()
    own_cluster = None
    message = public = None
    watchdog = None

    def report(text, who, public=None):
        """hotplug-error (`public`, if given: the guest reads it) + hotplug-status=error, once,
        by the outcome's owner; the log and stderr get `text`."""
        if not outcome.to_report(who):
            return
        log.error("%s failed: %s", command, text)
        try:
            with deadline.budget(deadline.Deadline(deadline.REPORT_END, started)):
                backend.failed("%s failed: %s" % (command, text if public is None else public))
        except BlockRbdError as exc:
            log.error("could not report the failure in xenstore: %s", exc)
        finally:
            outcome.written.set()
        if on_reported is not None:
            on_reported(1)

    try:
        config = config_mod.load()
        if own_logging:
            log_mod.setup(config["log.file"], config["log.syslog"], config["log.verbose"])
        if cluster is None or not cluster.serves(config):
            # (the service's connection predates an edit of the cephx identity: not ours to use)
            cluster = own_cluster = Cluster(config)
        budget = config["timeouts.hotplug"]
        with deadline.budget(deadline.Deadline(budget, started)):
            watchdog = threading.Timer(
                _watchdog_delay(budget, started, time.monotonic()),
                contextvars.copy_context().run,
                (report, "not finished when its %g s budget (timeouts.hotplug) ran out: dom0 is overloaded "
                 "or a step hung (see the log)" % budget, Outcome.WATCHDOG))
            watchdog.daemon = True
            watchdog.start()
            log.debug("%s: start (XENBUS_PATH=%s)", command, path)
            if command == "add":
                add(config, backend, cluster, outcome,
                    failing=lambda exc: report(_describe(exc), Outcome.RUN, _public(exc)))
            else:
                remove(config, backend, cluster)
            _finish_pending(config, cluster)
    except Exception as exc:  # BlockRbdError, or a bug: still tell libxl and the operator, in one line
        if not isinstance(exc, BlockRbdError):
            log.debug("internal error", exc_info=True)
        message, public = _describe(exc), _public(exc)
    if watchdog is not None:
        watchdog.cancel()
    if before_report is not None:
        before_report()
    if message is not None:
        report(message, Outcome.RUN, public)
    elif not outcome.take(Outcome.RUN):
        message = "reported by the watchdog"  # the run ended after all, but libxl was told it failed
    if outcome.reported:
        # the watchdog's report may still be under way: an exit now would cut it short
        outcome.written.wait(max(0.0, started + deadline.REPORT_END - time.monotonic()))
    if own_cluster is not None and time.monotonic() - started < deadline.CLEANUP_END:
        # After the report, and only while there is time: shutting librados down can take
        # seconds on an overloaded dom0, and the process's exit frees it all the same.
        own_cluster.close()
    xs.close()
    return 0 if message is None else 1


def _on_alarm(_signum, _frame):
    # Every step draws on the budget; this fires only if one did not.
    raise HotplugTimeout("still running %.0f s after start; giving up before libxl's SIGKILL"
                         % deadline.CLEANUP_END)


def main(command, environ=None, started=None):
    """Entry point for libxl, in-process.  Returns the exit code."""
    started = time.monotonic() if started is None else started
    environ = os.environ if environ is None else environ
    process.fix_path(environ)
    path = environ.get("XENBUS_PATH", "")
    if command not in ("add", "remove") or not path:
        sys.stderr.write("block-rbd: usage: XENBUS_PATH=backend/vbd/DOMID/DEVID block-rbd add|remove\n")
        return 1
    # Log with the defaults until the configuration is read: a bad config must be logged too.
    log_mod.setup(config_mod.SCHEMA["log.file"][0])
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max(1, int(deadline.CLEANUP_END - (time.monotonic() - started))))
    try:
        return run(command, path, started, before_report=lambda: signal.alarm(0))
    finally:
        signal.alarm(0)
