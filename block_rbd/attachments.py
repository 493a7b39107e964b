"""Attach and detach on this host: the engine under `add`, `remove` and `map`.

attach: check the image, record the holder (intent), register cluster-wide,
map (or reuse the existing mapping); undo in reverse order on any failure.
detach: drop the holder; the last holder out unmaps and deregisters.
"""

import logging
import time

from . import mappers
from .errors import BlockRbdError, FeaturesUnsupported
from .state import LocalState, new_record
from .target import parse_spec
from .target import read_only as is_read_only

log = logging.getLogger("block-rbd")

# The holder name of `block-rbd map` (libxl's holders are backend paths).
MANUAL = "manual"


def local_state(config):
    return LocalState(config["state_dir"], config["timeouts.lock"])


def attach(config, cluster, target, mode, holder, info, registry=None):
    """Map target.spec for `holder` in `mode`; returns the Mapping.

    `registry` (cluster-wide access modes) is consulted before mapping and
    told about the mapping afterwards; None means no cluster-wide check.
    """
    spec = target.spec
    read_only = is_read_only(mode)
    if target.clone:
        # clone= : create the image from the golden snapshot on first attach.
        from . import images
        images.ensure_clone(cluster, target)  # the head now exists: checked or created
    if not target.clone or spec.snap:
        cluster.check_image(spec)
    state = local_state(config)
    with state.lock(spec):
        record = state.load(spec, read_only) or new_record(spec, read_only)
        record["holders"][holder] = dict(info, mode=mode, since=int(time.time()))
        state.save(spec, read_only, record)
        registered = False
        try:
            if registry is not None:
                registry.acquire(cluster, spec, mode, holder, info)
                registered = True
            mapping = _map(config, cluster, target, read_only, record)
            record["mapper"], record["device"] = mapping.mapper, mapping.device
            state.save(spec, read_only, record)
            if registry is not None:
                registry.mapped(cluster, spec, holder, mapping)
        except BaseException:
            _undo(config, cluster, state, spec, read_only, holder, registry if registered else None)
            raise
    return mapping


def _map(config, cluster, target, read_only, record):
    if record["mapper"]:
        # Another holder already mapped this image in this mode: share it.
        mapper = mappers.get(record["mapper"], config, cluster)
    else:
        mapper = mappers.choose(config, target.mapper, cluster)
    try:
        return mapper.map(target.spec, read_only, _options(config, mapper.name, read_only, target))
    except FeaturesUnsupported as exc:
        if target.mapper or config["mapper"] != "auto" or record["mapper"]:
            raise
        fallback = mappers.get("nbd", config, cluster)
        if fallback.unavailable():
            raise
        log.warning("%s; falling back to rbd-nbd", exc)
        return fallback.map(target.spec, read_only, _options(config, "nbd", read_only, target))


def _options(config, mapper_name, read_only, target):
    """Map options; access.exclusive_map (hard mode) adds the kernel's/rbd-nbd's `exclusive`."""
    options = tuple(target.map_options)
    if (config["access.exclusive_map"] and not read_only and mapper_name in ("krbd", "nbd")
            and "exclusive" not in options):
        options += ("exclusive",)  # the lock is never handed over: see docs/access-modes.rst
    return options


def _undo(config, cluster, state, spec, read_only, holder, registry):
    """Reverse a partial attach; report, never mask, a failure while undoing."""
    record = state.load(spec, read_only)
    try:
        if record is not None:
            record["holders"].pop(holder, None)
            if record["holders"]:
                state.save(spec, read_only, record)
            else:
                _unmap_all(config, cluster, spec, read_only, record["mapper"])
                state.delete(spec, read_only)
        if registry is not None:
            registry.release(cluster, spec, holder)
    except BlockRbdError as exc:
        log.error("cleanup after a failed attach of %s left something behind: %s", spec, exc)


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


def detach(config, cluster, spec, read_only, holder, registry=None):
    """Drop `holder`; unmap when it was the last.  Returns what was done, for the log."""
    state = local_state(config)
    with state.lock(spec):
        record = state.load(spec, read_only)
        if record is None or holder not in record["holders"]:
            # Nothing recorded for us: a failed add that cleaned up, or a repeat remove.
            if registry is not None:
                registry.release(cluster, spec, holder)
            return "nothing to do"
        del record["holders"][holder]
        if record["holders"]:
            state.save(spec, read_only, record)
            if registry is not None:
                registry.release(cluster, spec, holder)
            return "still used by %s" % ", ".join(sorted(record["holders"]))
        _unmap_all(config, cluster, spec, read_only, record["mapper"])
        state.delete(spec, read_only)
        if registry is not None:
            registry.release(cluster, spec, holder)
        return "unmapped %s" % (record["device"] or spec)


def holders_of(config, spec, read_only):
    record = local_state(config).load(spec, read_only)
    return dict(record["holders"]) if record else {}


def host_mappings(config):
    """This host's mappings: what the mappers see, joined with block-rbd's records."""
    records = {(r["image"], r["read_only"]): r for r in local_state(config).records()}
    rows = []
    for name in mappers.AUTO_ORDER:
        mapper = mappers.get(name, config)
        if mapper.unavailable():
            continue
        for mapping in mapper.mapped():
            record = records.pop((str(mapping.spec), mapping.read_only), None)
            rows.append(_row(mapping.spec, mapping.read_only, name, mapping.device, record))
    for (image, ro), record in sorted(records.items()):
        rows.append(_row(parse_spec(image), ro, record["mapper"], None, record))
    return rows


def _row(spec, ro, mapper, device, record):
    holders = record["holders"] if record else {}
    return {
        "image": str(spec.head()), "snap": spec.snap, "mode": "ro" if ro else "rw",
        "mapper": mapper, "device": device,
        "backends": sorted(h for h in holders if h != MANUAL),
        "manual": MANUAL in holders,
        "managed": record is not None,
    }
