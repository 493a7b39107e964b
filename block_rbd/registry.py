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

Three parts: reading the facts (records, watchers, lock owners), deciding
(policy.py, pure), writing (one write-op helper).  Every call is bounded: the
ops by the connection's timeouts, the waits by access.timeout within the
run's budget.
"""

import errno
import json
import logging
import struct
import time
import uuid
from dataclasses import dataclass

from . import deadline, policy
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
# How long to look for the client a new mapping opened the image with.
CLIENT_SEARCH = 3


@dataclass(frozen=True)
class Token:
    """What acquire() hands to mapped(): our key and the watchers before mapping."""

    key: str
    watchers_before: frozenset
    seconds: float  # how long the check took (benchmarks, tests)


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


def addr_host(addr):
    """The IP of a client address: "127.0.0.1:0/519349328", "v2:[::1]:0/7" -> "127.0.0.1", "::1"."""
    addr = addr.split("/", 1)[0]
    for prefix in ("v1:", "v2:", "any:"):
        if addr.startswith(prefix):
            addr = addr[len(prefix):]
    host = addr.rsplit(":", 1)[0] if ":" in addr else addr
    return host.strip("[]")


CEPH_NOSNAP = 0xFFFFFFFFFFFFFFFE


def image_size(ioctx, spec):
    """The image's size, as librbd reads it (cls_rbd get_size on the header), without
    opening the image: two small ops, no watch, no librbd threads (upkeep asks often)."""
    rados, _rbd = bindings()
    header = header_object(ioctx, spec)
    try:
        ret, out = ioctx.execute(header, "rbd", "get_size", struct.pack("<Q", CEPH_NOSNAP))
    except rados.Error as exc:
        raise translate(exc, "size of %s" % spec.head()) from None
    if ret < 9:
        raise ClusterError("image %s: unreadable size reply" % spec.head())
    _order, size = struct.unpack("<BQ", out[:9])
    return size


def _decode(key, value):
    try:
        data = json.loads(value)
        return Registration(host=data["host"], holder=data["holder"], mode=data["mode"],
                            vm=data.get("vm"), domid=data.get("domid"), devid=data.get("devid"),
                            client=data.get("client"), since=float(data.get("since") or 0))
    except (ValueError, KeyError, TypeError):
        log.warning("ignoring an unreadable access record %s", key)
        return None


def _encode(reg):
    return json.dumps(reg.as_record(), sort_keys=True).encode()


class _VersionChanged(Exception):
    """The header changed between our read and our write."""


# ---- reading the facts ------------------------------------------------------------

def read_records(ioctx, header):
    """({omap key: Registration}, the header's version)."""
    rados, _rbd = bindings()
    with rados.ReadOpCtx() as op:
        items, _ret = ioctx.get_omap_vals(op, "", PREFIX, 1000)
        ioctx.operate_read_op(op, header)
        found = {key: _decode(key, value) for key, value in items}
    return {k: v for k, v in found.items() if v is not None}, ioctx.get_last_version()


def read_clients(cluster, spec):
    """(watcher addresses, exclusive-lock owner addresses) of the image."""
    rados, rbd = bindings()
    with cluster.image(spec.head()) as image:
        try:
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


# ---- writing ----------------------------------------------------------------------

def write(ioctx, header, what, set_regs=(), remove_keys=(), version=None):
    """One atomic omap update of the header; _VersionChanged if `version` no longer holds."""
    rados, _rbd = bindings()
    op = ioctx.create_write_op()
    try:
        if version is not None:
            op.assert_version(version)
        if set_regs:
            ioctx.set_omap(op, tuple(PREFIX + r.key for r in set_regs), tuple(_encode(r) for r in set_regs))
        if remove_keys:
            ioctx.remove_omap_keys(op, tuple(remove_keys))
        ioctx.operate_write_op(op, header)
    except rados.Error as exc:
        if version is not None and getattr(exc, "errno", None) in (errno.ERANGE, errno.EOVERFLOW):
            raise _VersionChanged() from None
        raise translate(exc, what) from None
    finally:
        op.release()


class Registry:
    """The `registry` seam of attachments.attach/detach."""

    def __init__(self, config):
        self.host = config.host
        self.stale = config["access.stale"]
        self.timeout = config["access.timeout"]

    def _own_addrs(self, cluster):
        return {cluster.rados.get_addrs()} if hasattr(cluster.rados, "get_addrs") else set()

    def states(self, cluster, spec):
        """Every Registration of the image with its state, and the facts behind it."""
        with cluster.ioctx(spec.pool, spec.namespace) as ioctx:
            records, _version = read_records(ioctx, header_object(ioctx, spec))
        watchers, owners = read_clients(cluster, spec)
        now = time.time()
        regs = [policy.with_state(r, watchers, now, PENDING_GRACE) for r in records.values()]
        return regs, watchers, owners

    # ---- the mutex -------------------------------------------------------------

    def _lock(self, ioctx, header, cookie, spec):
        rados, _rbd = bindings()

        def attempt():
            try:
                ioctx.lock_exclusive(header, MUTEX, cookie, desc="block-rbd %s" % self.host,
                                     duration=MUTEX_SECONDS)
                return True
            except rados.ObjectBusy:
                return False
            except rados.Error as exc:
                raise translate(exc, "access lock of %s" % spec.head()) from None

        deadline.retry(attempt, what="the access check of %s" % spec.head(), cap=self.timeout,
                       interval=0.002, max_interval=0.05,
                       give_up=lambda waited: AccessDenied(
                           "%s: the access check stayed busy for %.0f s (another host is checking, "
                           "or died while checking); retry" % (spec.head(), waited)))

    def _unlock(self, ioctx, header, cookie):
        rados, _rbd = bindings()
        try:
            ioctx.unlock(header, MUTEX, cookie)
        except rados.Error as exc:  # expired and taken over: nothing of ours to free
            log.debug("access mutex on %s already gone: %s", header, exc)

    # ---- the seam ----------------------------------------------------------------

    def acquire(self, cluster, spec, request, local_holders=frozenset()):
        """Check the policy and register `request`, atomically across hosts; a Token.

        local_holders: this host's holders of any mapping of the image.  A
        registration of this host whose holder is not among them and whose
        client no longer watches is a leftover of a run that died here: ours
        to drop, never a reason to refuse or to fence.
        """
        started = time.monotonic()
        key = policy.holder_key(self.host, request.holder)
        if spec.snap:
            return Token(key, frozenset(), 0.0)  # snapshots are immutable: nothing to arbitrate
        reg = Registration(host=self.host, holder=request.holder, mode=request.mode, vm=request.vm,
                           domid=request.domid, devid=request.devid, since=time.time())
        cookie = uuid.uuid4().hex
        fenced = set()
        with cluster.ioctx(spec.pool, spec.namespace) as ioctx:
            header = header_object(ioctx, spec)

            def attempt():
                self._lock(ioctx, header, cookie, spec)
                try:
                    return self._check_and_register(cluster, ioctx, header, spec, reg, request.incoming,
                                                    local_holders, fenced)
                except _VersionChanged:
                    return None  # librbd or an expired mutex changed the header: read again
                finally:
                    self._unlock(ioctx, header, cookie)

            watchers = deadline.retry(attempt, what="registering access to %s" % spec.head(), cap=self.timeout,
                                      give_up=lambda waited: AccessDenied(
                                          "%s: the image header kept changing during the access check "
                                          "for %.0f s; retry" % (spec.head(), waited)))
        token = Token(key, frozenset(watchers), time.monotonic() - started)
        log.info("access %s to %s granted to %s in %.3f s%s", request.mode, spec.head(), key, token.seconds,
                 " (an incoming live migration of VM %s)" % request.vm if request.incoming else "")
        return token

    def _check_and_register(self, cluster, ioctx, header, spec, reg, incoming, local_holders, fenced):
        """Under the mutex: read, decide, write; the watchers seen (for mapped())."""
        records, version = read_records(ioctx, header)
        watchers, owners = read_clients(cluster, spec)
        now = time.time()
        mine = [r for k, r in records.items() if k == PREFIX + reg.key]
        stated = [policy.with_state(r, watchers, now, PENDING_GRACE) for k, r in records.items()
                  if k != PREFIX + reg.key]
        leftovers = policy.local_leftovers(stated, self.host, local_holders)
        others = [r for r in stated if r not in leftovers]
        own = self._own_addrs(cluster)
        # Our own earlier registration's client (a repeated `map`) is no stranger.
        decision = policy.decide(
            spec.head(), reg.mode, reg.identity, others, host=self.host, incoming=incoming,
            foreign_watchers=policy.foreign(watchers, others + mine, own),
            foreign_lock_owners=policy.foreign(owners, others + mine, own),
            stale=self.stale)
        for dead in decision.fence:
            if dead.client and dead.client not in fenced:
                self._blocklist(cluster, dead.client)
                fenced.add(dead.client)
            log.warning("fenced stale access holder %s of %s (%s)", dead.key, spec.head(), dead.describe())
        for left in leftovers:
            log.warning("dropped %s's own leftover access registration %s of %s (%s)",
                        self.host, left.key, spec.head(), left.describe())
        dropped = tuple(PREFIX + r.key for r in tuple(decision.fence) + tuple(leftovers))
        write(ioctx, header, "registering access to %s" % spec.head(), set_regs=(reg,),
              remove_keys=dropped, version=version)
        return watchers

    def mapped(self, cluster, spec, token, mapping):
        """Record the mapping's client address (what says it is alive)."""
        if spec.snap:
            return
        with cluster.ioctx(spec.pool, spec.namespace) as ioctx:
            header = header_object(ioctx, spec)
            client = mapping.details.get("client_addr")  # krbd says it in sysfs
            if not client:
                # rbd-nbd/rbd-fuse may open the image a moment after the device appears.
                try:
                    client = deadline.retry(
                        lambda: self._find_client(ioctx, header, cluster, spec, token, mapping),
                        what="the mapping client of %s" % spec.head(), cap=min(self.timeout, CLIENT_SEARCH),
                        interval=0.05, max_interval=0.05, give_up=lambda waited: _NoClient())
                except _NoClient:
                    client = None
            records, _version = read_records(ioctx, header)
            reg = records.get(PREFIX + token.key)
            if reg is None:
                raise AccessDenied("%s: our access registration %s vanished while mapping "
                                   "(broken by an operator?)" % (spec.head(), token.key))
            write(ioctx, header, "recording access to %s" % spec.head(),
                  set_regs=(Registration(**dict(reg.as_record(), client=client)),))
        if not client:
            log.warning("%s: could not tell the mapping client of %s; it will look stale after %d s",
                        spec.head(), token.key, PENDING_GRACE)

    def _find_client(self, ioctx, header, cluster, spec, token, mapping):
        records, _version = read_records(ioctx, header)
        watchers, _owners = read_clients(cluster, spec)
        new = set(watchers) - token.watchers_before - self._own_addrs(cluster)
        if len(new) == 1:
            return new.pop()
        # A shared mapping (second holder on this host): its client is already recorded.
        for k, reg in records.items():
            if (k != PREFIX + token.key and reg.host == self.host and reg.client in watchers
                    and is_read_only(reg.mode) == mapping.read_only):
                return reg.client
        return None

    def release(self, cluster, spec, holder):
        """Delete our own registration; idempotent; the image may be gone."""
        if spec.snap:
            return
        key = PREFIX + policy.holder_key(self.host, holder)
        try:
            with cluster.ioctx(spec.pool, spec.namespace) as ioctx:
                write(ioctx, header_object(ioctx, spec), "releasing access to %s" % spec.head(),
                      remove_keys=(key,))
        except ImageNotFound:
            return

    def rehome(self, cluster, spec, holders, start, fence=True):
        """A new mapping client for this host's registrations of `holders` on spec.

        `start()` starts it: a new rbd-nbd daemon for a device whose daemon died
        (fence: the dead client is blocklisted first: its watch lingers at the
        OSDs until it times out, 30 s, and until then librbd in the new client
        would wait for the exclusive lock it held), or in place of one that
        exits cleanly (restart-nbd).  The registrations name the new client
        after: a dead address there would make them look stale to every host.
        Returns start()'s result.
        """
        keys = [PREFIX + policy.holder_key(self.host, h) for h in holders]
        with cluster.ioctx(spec.pool, spec.namespace) as ioctx:
            header = header_object(ioctx, spec)
            records, _version = read_records(ioctx, header)
            here = {addr_host(a) for a in self._own_addrs(cluster)}
            for client in sorted({records[k].client for k in keys if k in records and records[k].client}):
                if not fence:
                    continue
                if addr_host(client) in here:
                    self._blocklist(cluster, client)
                else:  # a misrecorded client must never get another host fenced
                    log.warning("%s: the recorded client %s is not on this host (%s): not fenced",
                                spec.head(), client, ", ".join(sorted(here)) or "address unknown")
            before = frozenset(read_clients(cluster, spec)[0])
            result = start()
            new = deadline.retry(
                lambda: (lambda found: found.pop() if len(found) == 1 else None)(
                    set(read_clients(cluster, spec)[0]) - before - self._own_addrs(cluster)),
                what="the new mapping client of %s" % spec.head(), cap=CLIENT_SEARCH * 3,
                interval=0.05, max_interval=0.2,
                give_up=lambda waited: AccessDenied("%s: no new client watched the image %.0f s after the "
                                                    "new daemon started" % (spec.head(), waited)))
            records, _version = read_records(ioctx, header)
            write(ioctx, header, "recording the new client of %s" % spec.head(),
                  set_regs=tuple(Registration(**dict(records[k].as_record(), client=new)) for k in keys
                                 if k in records))
        log.info("%s: registrations of %s now name client %s", spec.head(), ", ".join(sorted(holders)), new)
        return result

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
        with cluster.ioctx(spec.pool, spec.namespace) as ioctx:
            header = header_object(ioctx, spec)
            records, _version = read_records(ioctx, header)
            reg = records.get(PREFIX + key)
            if reg is None:
                raise BlockRbdError("%s has no access registration %s (see block-rbd locks %s)"
                                    % (spec.head(), key, spec.head()))
            fenced = None
            if blocklist and reg.client:
                self._blocklist(cluster, reg.client)
                fenced = reg.client
            write(ioctx, header, "removing access registration of %s" % spec.head(), remove_keys=(PREFIX + key,))
        return reg, fenced


class _NoClient(Exception):
    """No mapping client found in time (not an error: logged, and the registration stays pending)."""
