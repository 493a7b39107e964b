"""Attach and detach on this host: the engine under `add`, `remove` and `map`.

attach: check the image, record the holder (intent), register cluster-wide,
map (or reuse the existing mapping), publish; undo in reverse order on any
failure, all in one place.
detach: drop the holder; the last holder out unmaps.  Local work first: the
unmap needs no cluster.  The cluster-wide release is recorded as pending
before it is tried, so a cluster that is down (or a run that is killed)
leaves a release for the next run here to finish, never a registration that
nobody on this host remembers.
"""

import logging
import time

from . import deadline, mappers
from .errors import (BlockRbdError, ClusterError, CorruptRecord, DeviceBusy, FeaturesUnsupported, HotplugTimeout,
                     StateError, TargetError)
from .state import Holder, MapRecord, local_state, record_of_path
from .target import format_qos, parse_qos, parse_spec, qos_options
from .target import read_only as is_read_only

log = logging.getLogger("block-rbd")

# The holder name of `block-rbd map` (libxl's holders are backend paths).
MANUAL = "manual"


def attach(config, cluster, target, request, registry, publish=None, failing=None):
    """Map target.spec for `request` (a policy.Request); returns the Mapping.

    `registry` is consulted before mapping and told about the mapping after;
    `publish(mapping)` (hotplug: the backend's physical-device) is the last
    step, undone with the rest if it fails.  `failing(exc)` (hotplug: report
    it) is told of a failure before the partial attach is undone.
    """
    spec = target.spec
    read_only = is_read_only(request.mode)
    requested = mapper_for(config, target)  # a refusal before anything is done
    if target.clone:
        # clone= : create the image from the golden snapshot on first attach.
        from . import images
        images.ensure_clone(cluster, target)  # the head now exists: checked or created
    if not target.clone or spec.snap:
        cluster.check_image(spec)
    state = local_state(config)
    with state.lock(spec):
        record = state.load(spec, read_only) or MapRecord(str(spec), read_only)
        record.hold(request.holder, Holder(request.mode, int(time.time()), request.vm, request.domid,
                                           request.devid))
        state.save(record)
        registered = False
        try:
            if not spec.snap:
                state.note_registered(spec, request.holder)  # on disk first: a power loss may follow
            token = registry.acquire(cluster, spec, request, state.holders_of_image(spec))
            registered = True
            # Our key now holds the new registration: an older release of it is moot.
            state.pending_moot(spec, request.holder)
            mapping = _map(config, cluster, target, requested, read_only, record)
            record.mapped_by(mapping)
            state.save(record)
            registry.mapped(cluster, spec, token, mapping)
            if publish is not None:
                publish(mapping)
        except BaseException as exc:
            if failing is not None:
                failing(exc)
            with deadline.cleanup():
                _drop(config, cluster, state, spec, read_only, request.holder, registry if registered else None)
            raise
    return mapping


def qos_of(config, target):
    """The disk's I/O limits: the target's qos=, else the configured default; () for none."""
    if target.qos is not None:
        return target.qos
    return parse_qos(config["qos"]) if config["qos"] else ()


def mapper_for(config, target):
    """The mapper the target needs, or None for the configured choice.

    I/O limits are librbd's (krbd has none, rbd-fuse takes no config options), so
    a disk with limits gets rbd-nbd: in place of `auto` or of the configured
    mapper, when the limits are the disk's own.  A mapper the target names, or
    a configured default of limits with a configured mapper that has none, is
    refused rather than the limits silently dropped.
    """
    qos = qos_of(config, target)
    if not qos or target.mapper == "nbd":
        return target.mapper
    if target.mapper:
        raise TargetError("qos=%s needs mapper=nbd (librbd's limits); %s has no I/O limits: "
                          "use mapper=nbd or qos=none" % (format_qos(qos), target.mapper))
    configured = config["mapper"]
    if configured in ("auto", "nbd"):
        return "nbd"
    if target.qos is None:
        raise TargetError("the configured qos (%s) needs rbd-nbd but the configured mapper is %s, which has "
                          "no I/O limits: change one of them in %s" % (format_qos(qos), configured, config.path))
    log.info("qos=%s: mapping with rbd-nbd, not the configured %s (no I/O limits there)",
             format_qos(qos), configured)
    return "nbd"


def _map(config, cluster, target, requested, read_only, record):
    if record.mapper:
        # Another holder already mapped this image in this mode: share it.
        mapper = mappers.get(record.mapper, config, cluster)
    else:
        mapper = mappers.choose(config, requested, cluster)
    try:
        return mapper.map(target.spec, read_only, _options(config, mapper.name, read_only, target))
    except FeaturesUnsupported as exc:
        if requested or config["mapper"] != "auto" or record.mapper:
            raise
        fallback = mappers.get("nbd", config, cluster)
        if fallback.unavailable():
            raise
        log.warning("%s; falling back to rbd-nbd", exc)
        return fallback.map(target.spec, read_only, _options(config, "nbd", read_only, target))


def _options(config, mapper_name, read_only, target):
    """Map options; access.exclusive_map (hard mode) adds the kernel's/rbd-nbd's `exclusive`,
    qos its librbd limits (rbd-nbd: mapper_for sent every disk with limits there)."""
    options = tuple(target.map_options)
    if (config["access.exclusive_map"] and not read_only and mapper_name in ("krbd", "nbd")
            and "exclusive" not in options):
        options += ("exclusive",)  # the lock is never handed over: see README.rst, access modes
    if mapper_name == "nbd":
        options += qos_options(qos_of(config, target))
    return options


def _drop(config, cluster, state, spec, read_only, holder, registry):
    """Undo a partial attach (under the image's lock); report, never mask, a failure."""
    try:
        if registry is None:
            state.forget_registered(spec, holder)  # nothing of it reached Ceph
        _let_go(config, cluster, state, spec, read_only, holder, registry)
    except BlockRbdError as exc:
        log.error("cleanup after a failed attach of %s left something behind: %s", spec, exc)


def _let_go(config, cluster, state, spec, read_only, holder, registry):
    """Drop `holder` here, unmap if it was the last, then release it cluster-wide.

    The pending release is written first: from then on either the record or
    the pending release names the registration, whatever kills us.
    """
    record = state.load(spec, read_only)
    if registry is not None and not spec.snap:
        state.pend_release(spec, holder)
        state.forget_registered(spec, holder)  # the pending release names it now
    done = "nothing to do"
    if record is not None and record.drop(holder):
        if record.holders:
            state.save(record)
            done = "still used by %s" % ", ".join(sorted(record.holders))
        else:
            _unmap_all(config, cluster, spec, read_only, record.mapper)
            state.delete(spec, read_only)
            done = "unmapped %s" % (record.device or spec)
    if registry is not None and not spec.snap:
        if not _release(cluster, state, registry, spec, holder):
            done += "; cluster-wide release pending"
    return done


def _release(cluster, state, registry, spec, holder):
    """Release the registration in Ceph; False (and the release stays pending) if Ceph did not answer."""
    try:
        registry.release(cluster, spec, holder)
    except (ClusterError, HotplugTimeout) as exc:
        log.warning("%s: the cluster-wide release of %s is pending (%s); the next block-rbd run that "
                    "reaches the cluster completes it (or: block-rbd release-pending)", spec.head(), holder, exc)
        return False
    state.release_done(spec, holder)
    return True


def _unmap_all(config, cluster, spec, read_only, mapper_name):
    """Unmap every mapping of spec in this mode by the recorded mapper (or any, if unknown)."""
    names = [mapper_name] if mapper_name else list(mappers.AUTO_ORDER)
    for name in names:
        mapper = mappers.get(name, config, cluster)
        if mapper_name is None and mapper.unavailable():
            continue
        mapping = mapper.find(spec, read_only)
        if mapping is not None:
            mapper.unmap(mapping)
        else:
            mapper.discard_partial(spec, read_only)


def detach(config, cluster, spec, read_only, holder, registry):
    """Drop `holder`; unmap when it was the last.  Returns what was done, for the log.

    With nothing recorded for `holder` here, the cluster is not contacted.
    """
    state = local_state(config)
    with state.lock(spec):
        try:
            record = state.load(spec, read_only)
        except CorruptRecord as exc:
            return _let_go_unrecorded(config, cluster, state, spec, read_only, holder, registry, exc)
        if record is None or holder not in record.holders:
            # A failed add that cleaned up, or a repeat remove.
            return "nothing to do"
        return _let_go(config, cluster, state, spec, read_only, holder, registry)


def _let_go_unrecorded(config, cluster, state, spec, read_only, holder, registry, corrupt):
    """detach() when the record cannot be read: unmap what the mappers show mapped (the
    kernel, the daemons), set the record aside, release `holder` cluster-wide.

    A device still in use has a holder the record no longer names: it stays mapped,
    and so does the record, for the remove of that holder.
    """
    log.warning("%s; unmapping %s (%s) as this host's mappers show it", corrupt, spec, "ro" if read_only else "rw")
    if registry is not None and not spec.snap:
        state.pend_release(spec, holder)
        state.forget_registered(spec, holder)
    try:
        _unmap_all(config, cluster, spec, read_only, None)
    except DeviceBusy as exc:
        done = "left mapped, the record as it is: %s" % exc
    else:
        aside = state.set_aside(spec, read_only)
        if aside:
            log.warning("set the unreadable record %s aside as %s", corrupt.path, aside)
        done = "unmapped what was mapped; the unreadable record set aside"
    if registry is not None and not spec.snap:
        if not _release(cluster, state, registry, spec, holder):
            done += "; cluster-wide release pending"
    return done


def release_pending(config, cluster, registry):
    """Finish the cluster-wide releases earlier runs left pending; (done, still pending).

    A release whose image another run holds locked right now is that run's
    own, in flight: left to it.  One whose holder is back in a record here
    (re-attached, or its remove failed before letting go) is moot and just
    forgotten.  Stops at the first one Ceph does not answer: the rest would
    wait for the same cluster.
    """
    state = local_state(config)
    for bad in state.corrupt_ledger():
        # Never retried, never a crash: kept for the operator (doctor names it).
        aside = state.set_aside_ledger(bad)
        if aside:
            log.warning("%s; set aside as %s: a release it held is not retried (block-rbd locks IMAGE shows "
                        "what is registered)", bad, aside)
    done = []
    items = state.pending()
    for index, item in enumerate(items):
        spec = item.spec
        with state.lock(spec, wait=False) as held:
            if not held or not state.is_pending(spec, item.holder):
                continue  # in flight in another run, or finished by it meanwhile
            try:
                holders = state.holders_of_image(spec)
            except StateError as exc:
                log.warning("the cluster-wide release of %s by %s stays pending: %s", spec, item.holder, exc)
                continue
            if item.holder in holders:
                state.release_done(spec, item.holder)
                continue
            if not _release(cluster, state, registry, spec, item.holder):
                return done, items[index:]
        done.append(item)
        log.info("completed the pending cluster-wide release of %s by %s", spec, item.holder)
    return done, []


def holders_of(config, spec, read_only):
    """{holder name: Holder} of this host's mapping of spec in that mode."""
    record = local_state(config).load(spec, read_only)
    return dict(record.holders) if record else {}


FOLLOW_WAIT = 10  # krbd and rbd-nbd follow a resize in milliseconds, rbd-fuse within 1 s


def follow_size(config, spec=None, size=None, names=mappers.AUTO_ORDER):
    """This host's mappings of spec (head, read-write and read-only; None: every image) made to
    follow their image's size; [(Mapping, bytes)].  With `size`, waits (at most FOLLOW_WAIT s)
    until each has it."""
    done = []
    for name in names:
        mapper = mappers.get(name, config)
        if mapper.unavailable():
            continue
        for mapping in mapper.mapped():
            if spec is not None and mapping.spec != spec.head():
                continue
            if size is None:
                done.append((mapping, mapper.follow_size(mapping)))
                continue
            got = deadline.retry(
                lambda: (lambda now: now if now >= size else None)(mapper.follow_size(mapping, size)),
                what="%s to follow the resize" % mapping.device, cap=FOLLOW_WAIT,
                give_up=lambda waited: BlockRbdError("%s (%s) does not show the new size %d bytes after %.0f s"
                                                     % (mapping.device, name, size, waited)))
            done.append((mapping, got))
    return done


def host_mappings(config):
    """This host's mappings: what the mappers see, joined with block-rbd's records.

    Cluster-wide releases still pending are rows too (pending_release): what a
    remove without the cluster left to finish.
    """
    state = local_state(config)
    records = {(r.image, r.read_only): r for r in state.records()}
    # Unreadable records: by the (image, mode) their file names; a mapping of theirs is managed.
    corrupt = {}
    for bad in state.corrupt_records():
        named = record_of_path(bad.path)
        corrupt[(str(named[0]), named[1]) if named else (bad.path, None)] = bad
    rows = []
    for name in mappers.AUTO_ORDER:
        mapper = mappers.get(name, config)
        if mapper.unavailable():
            continue
        for mapping in mapper.mapped():
            key = (str(mapping.spec), mapping.read_only)
            record = records.pop(key, None)
            rows.append(_row(mapping.spec, mapping.read_only, name, mapping.device, record,
                             corrupt=corrupt.pop(key, None)))
    for (image, ro), record in sorted(records.items()):
        rows.append(_row(parse_spec(image), ro, record.mapper, None, record))
    for (image, ro), bad in sorted(corrupt.items(), key=lambda item: item[1].path):
        rows.append(_row(parse_spec(image) if ro is not None else None, ro, None, None, None, corrupt=bad))
    for item in state.pending():
        rows.append(dict(_row(item.spec, None, None, None, None, holders=(item.holder,)),
                         managed=True, pending_release=True, since=int(item.since)))
    for bad in state.corrupt_ledger():
        rows.append(dict(_row(None, None, None, None, None, corrupt=bad), pending_release=True))
    return rows


def _row(spec, ro, mapper, device, record, holders=None, corrupt=None):
    """One row of host_mappings(); `corrupt`: the CorruptRecord of its unreadable record
    (its image is the one the file's name says, None when that says none)."""
    holders = holders if holders is not None else (record.holders if record else {})
    return {
        "image": str(spec.head()) if spec else None, "snap": spec.snap if spec else None,
        "mode": "-" if ro is None else "ro" if ro else "rw",
        "mapper": mapper, "device": device,
        "backends": sorted(h for h in holders if h != MANUAL),
        "manual": MANUAL in holders,
        "managed": record is not None or corrupt is not None,
        "pending_release": False,
        "corrupt": str(corrupt) if corrupt else None,
    }
