"""The libxl hotplug contract: `block-rbd add|remove` with XENBUS_PATH set.

add:    read the backend (one xenstore call) and the VM's uuid, attach, then
        write physical-device + physical-device-path (+ our private keys) in
        one transaction, then hotplug-status=connected.
remove: undo what the backend's keys (or, after a killed add, its params)
        name; idempotent, exit 0 when nothing is mapped.
failure: hotplug-error + hotplug-status=error in one transaction, one line
        in the log and on stderr, exit 1, nothing left behind.
"""

import logging
import os
import signal
import sys
import time

from . import attachments
from . import config as config_mod
from . import log as log_mod
from . import process
from .cluster import Cluster
from .errors import BlockRbdError, HotplugTimeout, TargetError
from .mappers.base import device_numbers
from .registry import Registry
from .target import effective_mode, parse, parse_spec, read_only
from .xenstore import Xenstore

log = logging.getLogger("block-rbd")

# Private backend keys: what `remove` needs, never a secret (the guest can read them).
KEY_IMAGE = "block-rbd-image"
KEY_MODE = "block-rbd-mode"
KEY_MAPPER = "block-rbd-mapper"


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

    def connected(self, device, mapping, mode):
        major, minor = device_numbers(device)
        self.xs.write({
            self.key("physical-device"): "%x:%x" % (major, minor),
            self.key("physical-device-path"): device,
            self.key(KEY_IMAGE): str(mapping.spec),
            self.key(KEY_MODE): mode,
            self.key(KEY_MAPPER): mapping.mapper,
        })
        self.xs.write({self.key("hotplug-status"): "connected"})

    def failed(self, message):
        self.xs.write({self.key("hotplug-error"): message, self.key("hotplug-status"): "error"})


def add(config, backend):
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
    info = {"host": config.host, "vm": backend.vm_uuid(frontend) if frontend else None,
            "domid": frontend, "devid": backend.devid, "backend": backend.path}
    registry = Registry(config)
    with Cluster(config) as cluster:
        mapping = attachments.attach(config, cluster, target, mode, backend.path, info, registry)
        try:
            backend.connected(mapping.device, mapping, mode)
        except BaseException:
            attachments.detach(config, cluster, target.spec, read_only(mode), backend.path, registry)
            raise
    log.info("add: %s mode %s -> %s via %s in %.2f s", target.spec, mode, mapping.device,
             mapping.mapper, time.monotonic() - started)


def remove(config, backend):
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
    with Cluster(config) as cluster:
        done = attachments.detach(config, cluster, spec, read_only(mode), backend.path, Registry(config))
    log.info("remove: %s mode %s: %s", spec, mode, done)


def _on_alarm(_signum, _frame):
    raise HotplugTimeout("gave up after the hotplug time budget; libxl would kill us at 40 s")


def main(command, environ=None):
    """Entry point for libxl.  Returns the exit code."""
    environ = os.environ if environ is None else environ
    process.fix_path(environ)
    path = environ.get("XENBUS_PATH", "")
    if command not in ("add", "remove") or not path:
        sys.stderr.write("block-rbd: usage: XENBUS_PATH=backend/vbd/DOMID/DEVID block-rbd add|remove\n")
        return 1
    log_mod.set_context(path)
    # Log with the defaults until the configuration is read: a bad config must be logged too.
    log_mod.setup(config_mod.SCHEMA["log.file"][0])
    xs = Xenstore()
    backend = Backend(xs, path)
    try:
        config = config_mod.load()
        log_mod.setup(config["log.file"], config["log.syslog"], config["log.verbose"])
        xs.timeout = config["timeouts.op"]
        signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(int(config["timeouts.hotplug"]))
        log.debug("%s: start (XENBUS_PATH=%s)", command, path)
        (add if command == "add" else remove)(config, backend)
        signal.alarm(0)
        return 0
    except BlockRbdError as exc:
        message = str(exc)
    except Exception as exc:  # a bug: still tell libxl and the operator, in one line
        log.debug("internal error", exc_info=True)
        message = "internal error: %s: %s" % (type(exc).__name__, " ".join(str(exc).split()))
    signal.alarm(0)
    log.error("%s failed: %s", command, message)
    try:
        backend.failed("%s failed: %s" % (command, message))
    except BlockRbdError as exc:
        log.error("could not report the failure in xenstore: %s", exc)
    return 1
