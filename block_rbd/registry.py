"""Cluster-wide access registrations, kept in Ceph on the image's header object.

Layout (on rbd_header.<image id>, so it goes away with the image):
  omap  "block-rbd.access.<host>:<holder>" -> JSON (host, holder, vm, domid,
        devid, mode, client, since): one key per attachment, so `remove`
        deletes exactly its own key and never another host's.
  lock  cls_lock "block-rbd.access" (NOT librbd's "rbd_lock"): a short-lived
        mutex around check-and-register, so N hosts racing get one winner.
        A different lock name leaves the exclusive-lock feature alone
        (librbd writers keep working); a duration frees it if we die in it.
The final write also asserts the header's version seen under the mutex, so
even a mutex that expired mid-check cannot let two writers in.

Every call is bounded: the ops by the connection's timeouts, the waits here by
access.timeout.
"""

import errno
import json
import logging
import struct
import time
import uuid

from . import policy
from .cluster import bindings, translate
from .errors import AccessDenied, BlockRbdError, ClusterError, ImageNotFound
from .policy import Registration
from .target import read_only as is_read_only

log = logging.getLogger("block-rbd")

PREFIX = "block-rbd.access."
MUTEX = "block-rbd.access"
# A healthy check holds the mutex for ~10-20 ms; this only matters when a
# checker dies holding it.
MUTEX_SECONDS = 4
# How long a registration may stay without a mapping client address.
PENDING_GRACE = 40


def header_object(ioctx, spec):
    """rbd_header.<id> of the image (one read of rbd_id.<name>)."""
    rados, _rbd = bindings()
    try:
        raw = ioctx.read("rbd_id." + spec.image, 4096)
    except rados.Error as exc:
        raise translate(exc, "image %s" % spec.head()) from None
    if len(raw) < 4:
        raise ClusterError("image %s: unreadable rbd_id object" % spec.head())
    (length,) = struct.unpack("<I", raw[:4])
    return "rbd_header." + raw[4:4 + length].decode()


def _decode(key, value):
    try:
        data = json.loads(value)
        return Registration(host=data["host"], holder=data["holder"], mode=data["mode"],
                            vm=data.get("vm"), domid=data.get("domid"), devid=data.get("devid"),
                            client=data.get("client"), since=float(data.get("since") or 0))
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable access record %s", key)
        return None


class Registry:
    """The `registry` seam of attachments.attach/detach."""

    def __init__(self, config):
        self.config = config
        self.host = config.host
        self.stale = config["access.stale"]
        self.timeout = config["access.timeout"]
        self._before = {}   # holder key -> watcher addresses before mapping
        self.last_check = None  # seconds the last acquire took (benchmarks)

    # ---- reading -------------------------------------------------------------

    def _records(self, ioctx, header):
        """{omap key: Registration} and the header's version."""
        rados, _rbd = bindings()
        with rados.ReadOpCtx() as op:
            items, _ret = ioctx.get_omap_vals(op, "", PREFIX, 1000)
            ioctx.operate_read_op(op, header)
            found = {key: _decode(key, value) for key, value in items}
        return {k: v for k, v in found.items() if v is not None}, ioctx.get_last_version()

    def _clients(self, ioctx, spec):
        """(watcher addresses, exclusive-lock owner addresses) of the image."""
        rados, rbd = bindings()
        try:
            with rbd.Image(ioctx, spec.image, read_only=True) as image:
                watchers = [w["addr"] for w in image.watchers_list()]
                owners = []
                if image.features() & rbd.RBD_FEATURE_EXCLUSIVE_LOCK:
                    # lock_get_owners fails on a read-only handle; list_lockers shows
                    # rbd_lock's holders: the exclusive-lock owner (cookie "auto ...").
                    lockers = image.list_lockers() or {}
                    owners = [addr for _client, _cookie, addr in lockers.get("lockers", [])]
        except (rados.Error, rbd.Error) as exc:
            raise translate(exc, "image %s" % spec.head()) from None
        return watchers, owners

    def _own_addrs(self, cluster):
        return {cluster.rados.get_addrs()} if hasattr(cluster.rados, "get_addrs") else set()

    def states(self, cluster, spec):
        """Every Registration of the image with its state, and the facts behind it."""
        with cluster.ioctx(spec.pool, spec.namespace) as ioctx:
            header = header_object(ioctx, spec)
            records, _version = self._records(ioctx, header)
            watchers, owners = self._clients(ioctx, spec)
        now = time.time()
        regs = [self._with_state(r, watchers, now) for r in records.values()]
        return regs, watchers, owners

    def _with_state(self, reg, watchers, now):
        state = policy.state_of(reg, watchers, now, PENDING_GRACE)
        return Registration(**dict(reg.as_record(), state=state))

    # ---- the mutex -------------------------------------------------------------

    def _lock(self, ioctx, header, cookie, deadline, spec):
        rados, _rbd = bindings()
        delay = 0.002
        while True:
            try:
                ioctx.lock_exclusive(header, MUTEX, cookie, desc="block-rbd %s" % self.host,
                                     duration=MUTEX_SECONDS)
                return
            except rados.ObjectBusy:
                pass
            except rados.Error as exc:
                raise translate(exc, "access lock of %s" % spec.head()) from None
            if time.monotonic() >= deadline:
                raise AccessDenied("%s: the access check stayed busy for %.0f s (another host is "
                                   "checking, or died while checking); retry" % (spec.head(), self.timeout))
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _unlock(self, ioctx, header, cookie):
        rados, _rbd = bindings()
        try:
            ioctx.unlock(header, MUTEX, cookie)
        except rados.Error as exc:  # expired and taken over: nothing of ours to free
            log.debug("access mutex on %s already gone: %s", header, exc)

    # ---- the seam ----------------------------------------------------------------

    def acquire(self, cluster, spec, mode, holder, info):
        """Check the policy and register `holder`, atomically across hosts."""
        if spec.snap:
            return  # snapshots are immutable: nothing to arbitrate
        started = time.monotonic()
        deadline = started + self.timeout
        rados, _rbd = bindings()
        reg = Registration(host=self.host, holder=holder, mode=mode, vm=info.get("vm"),
                           domid=_str(info.get("domid")), devid=_str(info.get("devid")), since=time.time())
        ident = reg.identity
        cookie = uuid.uuid4().hex
        fenced = set()
        with cluster.ioctx(spec.pool, spec.namespace) as ioctx:
            header = header_object(ioctx, spec)
            while True:
                self._lock(ioctx, header, cookie, deadline, spec)
                try:
                    records, version = self._records(ioctx, header)
                    watchers, owners = self._clients(ioctx, spec)
                    now = time.time()
                    others = [self._with_state(r, watchers, now) for k, r in records.items()
                              if k != PREFIX + reg.key]
                    # Our own earlier registration's client (a repeated `map`) is no stranger.
                    mine = [r for k, r in records.items() if k == PREFIX + reg.key]
                    own = self._own_addrs(cluster)
                    decision = policy.decide(
                        spec.head(), mode, ident, others,
                        foreign_watchers=policy.foreign(watchers, others + mine, own),
                        foreign_lock_owners=policy.foreign(owners, others + mine, own),
                        stale=self.stale)
                    for dead in decision.fence:
                        if dead.client and dead.client not in fenced:
                            self._blocklist(cluster, dead.client)
                            fenced.add(dead.client)
                        log.warning("fenced stale access holder %s of %s (%s)", dead.key, spec.head(),
                                    dead.describe())
                    record = reg.as_record()
                    op = ioctx.create_write_op()
                    try:
                        op.assert_version(version)
                        ioctx.set_omap(op, (PREFIX + reg.key,), (json.dumps(record, sort_keys=True).encode(),))
                        if decision.fence:
                            ioctx.remove_omap_keys(op, tuple(PREFIX + d.key for d in decision.fence))
                        ioctx.operate_write_op(op, header)
                    except rados.Error as exc:
                        if getattr(exc, "errno", None) in (errno.ERANGE, errno.EOVERFLOW):
                            # The header changed since we read it (librbd, or an
                            # expired mutex): read again.
                            if time.monotonic() < deadline:
                                continue
                        raise translate(exc, "registering access to %s" % spec.head()) from None
                    finally:
                        op.release()
                    self._before[reg.key] = set(watchers)
                    break
                finally:
                    self._unlock(ioctx, header, cookie)
        self.last_check = time.monotonic() - started
        log.info("access %s to %s granted to %s in %.3f s", mode, spec.head(), reg.key, self.last_check)

    def mapped(self, cluster, spec, holder, mapping):
        """Record the mapping's client address (what says it is alive)."""
        if spec.snap:
            return
        rados, _rbd = bindings()
        key = policy.holder_key(self.host, holder)
        before = self._before.pop(key, set())
        with cluster.ioctx(spec.pool, spec.namespace) as ioctx:
            header = header_object(ioctx, spec)
            client = mapping.details.get("client_addr")  # krbd says it in sysfs
            deadline = time.monotonic() + min(self.timeout, 3)
            while not client:
                records, _version = self._records(ioctx, header)
                watchers, _owners = self._clients(ioctx, spec)
                client = self._find_client(records, key, mapping, before, watchers, cluster)
                if client or time.monotonic() >= deadline:
                    break
                time.sleep(0.05)  # rbd-nbd/rbd-fuse may open the image a moment later
            records, _version = self._records(ioctx, header)
            reg = records.get(PREFIX + key)
            if reg is None:
                raise AccessDenied("%s: our access registration %s vanished while mapping "
                                   "(broken by an operator?)" % (spec.head(), key))
            record = dict(reg.as_record(), client=client)
            try:
                op = ioctx.create_write_op()
                try:
                    ioctx.set_omap(op, (PREFIX + key,), (json.dumps(record, sort_keys=True).encode(),))
                    ioctx.operate_write_op(op, header)
                finally:
                    op.release()
            except rados.Error as exc:
                raise translate(exc, "recording access to %s" % spec.head()) from None
        if not client:
            log.warning("%s: could not tell the mapping client of %s; it will look stale after %d s",
                        spec.head(), key, PENDING_GRACE)

    def _find_client(self, records, key, mapping, before, watchers, cluster):
        new = set(watchers) - before - self._own_addrs(cluster)
        if len(new) == 1:
            return new.pop()
        # A shared mapping (second holder on this host): its client is already recorded.
        ro = mapping.read_only
        for k, reg in records.items():
            if (k != PREFIX + key and reg.host == self.host and reg.client in watchers
                    and is_read_only(reg.mode) == ro):
                return reg.client
        return None

    def release(self, cluster, spec, holder):
        """Delete our own registration; idempotent; the image may be gone."""
        if spec.snap:
            return
        rados, _rbd = bindings()
        key = PREFIX + policy.holder_key(self.host, holder)
        self._before.pop(key, None)
        try:
            with cluster.ioctx(spec.pool, spec.namespace) as ioctx:
                header = header_object(ioctx, spec)
                op = ioctx.create_write_op()
                try:
                    ioctx.remove_omap_keys(op, (key,))
                    ioctx.operate_write_op(op, header)
                finally:
                    op.release()
        except ImageNotFound:
            return
        except rados.ObjectNotFound:
            return
        except rados.Error as exc:
            raise translate(exc, "releasing access to %s" % spec.head()) from None

    # ---- operators ------------------------------------------------------------------

    def _blocklist(self, cluster, address):
        rados, _rbd = bindings()
        try:
            cluster.rados.blocklist_add(address, 0)
            # As librbd's lock breaker does: our next ops then carry the epoch
            # holding the blocklist entry, so no OSD serves them before it
            # knows the fenced client is out.
            cluster.rados.wait_for_latest_osdmap()
        except rados.Error as exc:
            raise translate(exc, "blocklisting %s" % address) from None
        log.warning("blocklisted client %s", address)

    def break_lock(self, cluster, spec, key, blocklist=True):
        """Remove registration `key` (host:holder); blocklist its client first."""
        rados, _rbd = bindings()
        with cluster.ioctx(spec.pool, spec.namespace) as ioctx:
            header = header_object(ioctx, spec)
            records, _version = self._records(ioctx, header)
            reg = records.get(PREFIX + key)
            if reg is None:
                raise BlockRbdError("%s has no access registration %s (see block-rbd locks %s)"
                                    % (spec.head(), key, spec.head()))
            fenced = None
            if blocklist and reg.client:
                self._blocklist(cluster, reg.client)
                fenced = reg.client
            op = ioctx.create_write_op()
            try:
                ioctx.remove_omap_keys(op, (PREFIX + key,))
                ioctx.operate_write_op(op, header)
            except rados.Error as exc:
                raise translate(exc, "removing access registration of %s" % spec.head()) from None
            finally:
                op.release()
        return reg, fenced


def _str(value):
    return None if value is None or value == "" else str(value)


def from_config(config):
    """The registry hotplug and the CLI use (one place to turn it off later)."""
    return Registry(config)

