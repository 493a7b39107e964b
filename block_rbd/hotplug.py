"""The libxl hotplug contract: `block-rbd add|remove` with XENBUS_PATH set.

add:    read the backend (one xenstore call) and the VM's uuid, attach, then
        write physical-device + physical-device-path (+ our private keys) in
        one transaction, then hotplug-status=connected.
remove: undo what the backend's keys (or, after a killed add, its params)
        name; local work first, so it needs the cluster only to release the
        cluster-wide registration, and a cluster that does not answer leaves
        that release pending instead of failing the remove.
failure: hotplug-error + hotplug-status=error in one transaction, one line
        in the log and on stderr, exit 1, nothing left behind.

run() is one hotplug run, with one time budget for every step; main() calls
it in-process, the per-host service (service.py) in one of its threads with
its shared cluster connection.  Both behave the same.
"""

import logging
import os
import signal
import sys
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
from .xenstore import Xenstore

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
        self.xs.write({self.key("hotplug-error"): message, self.key("hotplug-status"): "error"})


def add(config, backend, cluster):
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
    mapping = attachments.attach(config, cluster, target, request, Registry(config),
                                 publish=lambda m: backend.connected(m, mode))
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


def run(command, path, started=None, cluster=None, xs_env=None, own_logging=True, before_report=None):
    """One hotplug run for backend `path`; returns the exit code.

    `started`: when the run began (CLOCK_MONOTONIC), for its budget.
    `cluster`: a shared connection (the service's), else one of our own.
    own_logging: set up the log handlers from the configuration (in-process);
    the service has set up its own.  before_report: called once the work is
    over, before a failure is reported (in-process: disarm the alarm, so it
    never cuts the report short).
    """
    started = time.monotonic() if started is None else started
    log_mod.set_context(path)
    xs = Xenstore(env=xs_env)
    backend = Backend(xs, path)
    own_cluster = None
    message = None
    try:
        config = config_mod.load()
        if own_logging:
            log_mod.setup(config["log.file"], config["log.syslog"], config["log.verbose"])
        if cluster is None or not cluster.serves(config):
            # (the service's connection predates an edit of the cephx identity: not ours to use)
            cluster = own_cluster = Cluster(config)
        with deadline.budget(deadline.Deadline(config["timeouts.hotplug"], started)):
            log.debug("%s: start (XENBUS_PATH=%s)", command, path)
            (add if command == "add" else remove)(config, backend, cluster)
            _finish_pending(config, cluster)
    except BlockRbdError as exc:
        message = str(exc)
    except Exception as exc:  # a bug: still tell libxl and the operator, in one line
        log.debug("internal error", exc_info=True)
        message = "internal error: %s: %s" % (type(exc).__name__, " ".join(str(exc).split()))
    if before_report is not None:
        before_report()
    if message is not None:
        log.error("%s failed: %s", command, message)
        try:
            with deadline.budget(deadline.Deadline(deadline.REPORT_END, started)):
                backend.failed("%s failed: %s" % (command, message))
        except BlockRbdError as exc:
            log.error("could not report the failure in xenstore: %s", exc)
    if own_cluster is not None and time.monotonic() - started < deadline.CLEANUP_END:
        # After the report, and only while there is time: shutting librados down can take
        # seconds on an overloaded dom0, and the process's exit frees it all the same.
        own_cluster.close()
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
