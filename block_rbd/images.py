"""Golden images and snapshots, all through librbd: clone, snapshot, rollback, flatten.

No `rbd` CLI: the cephx key stays in the process that already holds the
connection, and every call is bounded by the connection's op timeouts.
"""

import logging

from . import deadline
from .cluster import bindings, translate
from .errors import BlockRbdError, ClusterError, CloneConflict, ImageInUse, ImageNotFound
from .target import ImageSpec

log = logging.getLogger("block-rbd")

# How long the loser of a clone race waits for the winner's clone to get its
# parent link: librbd creates the child's header first and links it after.
CLONE_SETTLE = 5.0
SETTLE_STEP = 0.1


# ---- pure helpers ---------------------------------------------------------------

def parent_spec(info):
    """librbd's get_parent_image_spec() dict as an ImageSpec."""
    return ImageSpec(info["pool_name"], info["image_name"], info.get("pool_namespace", "") or "",
                     info["snap_name"])


def other_watchers(watchers, own_id):
    """Watchers of an image other than this client (librbd watches images it opens rw)."""
    return [w for w in watchers if w.get("id") != own_id]


def check_clone_size(wanted, golden_size, golden):
    """size= may only grow a clone: a clone smaller than its parent would cut the data off."""
    if wanted is not None and wanted < golden_size:
        raise BlockRbdError("size=%d is smaller than the golden snapshot %s (%d bytes)"
                            % (wanted, golden, golden_size))


def snapshot_rows(snaps, protected):
    """list_snaps() entries as plain rows (name, id, size, protected, timestamp)."""
    return [{"name": s["name"], "id": s["id"], "size": s["size"],
             "protected": bool(protected.get(s["name"])), "timestamp": s.get("timestamp")}
            for s in snaps]


def need_snap(spec, what):
    if not spec.snap:
        raise BlockRbdError("%s: name the snapshot as POOL/IMAGE@SNAP" % what)
    return spec


# ---- clone ----------------------------------------------------------------------

def exists(cluster, spec):
    """Whether the image (head) exists; a missing pool is still an error."""
    try:
        cluster.check_image(spec.head())  # one stat, not an image open
        return True
    except ImageNotFound:
        with cluster.ioctx(spec.pool, spec.namespace):
            pass  # raises "pool X does not exist" when it is the pool that is missing
        return False


def golden_size(cluster, golden):
    """The golden snapshot's size; a one-line error naming what is missing."""
    try:
        with cluster.image(golden) as image:
            return image.size()
    except ImageNotFound:
        if exists(cluster, golden):
            raise ImageNotFound("golden snapshot %s does not exist" % golden) from None
        raise ImageNotFound("golden image %s does not exist" % golden.head()) from None


def protect(cluster, snap):
    """Protect snap (clone v1 needs it); a concurrent protect by another host is success."""
    _rados, rbd = bindings()
    with cluster.image(snap.head(), read_only=False) as image:
        if image.is_protected_snap(snap.snap):
            return
        try:
            image.protect_snap(snap.snap)
            log.info("protected %s (clone v1: this cluster predates mimic clients)", snap)
        except rbd.ImageBusy:
            if not image.is_protected_snap(snap.snap):  # busy for another reason
                raise ClusterError("cannot protect %s: image busy" % snap) from None
        except rbd.Error as exc:
            raise translate(exc, "protecting %s" % snap) from None


def _clone_call(cluster, golden, child):
    rados, rbd = bindings()
    with cluster.ioctx(golden.pool, golden.namespace) as pio, \
            cluster.ioctx(child.pool, child.namespace) as cio:
        rbd.RBD().clone(pio, golden.image, golden.snap, cio, child.image)


def clone(cluster, golden, child, size=None):
    """Clone golden (POOL/IMAGE@SNAP) as child; returns "created" or "raced".

    Clone v2 when the cluster allows it (librbd's default format "auto"
    picks it); on a pre-mimic cluster librbd refuses an unprotected parent
    (EINVAL), so the snapshot is protected and the clone retried.  Losing a
    race to another host is success when the winner made the same clone.
    """
    rados, rbd = bindings()
    child = child.head()
    if size is not None:
        check_clone_size(size, golden_size(cluster, golden), golden)
    what = "cloning %s from %s" % (child, golden)
    try:
        try:
            _clone_call(cluster, golden, child)
        except rbd.InvalidArgument:
            # Unprotected parent on a v1 cluster, or another host protected it
            # meanwhile: protect (idempotent) and try once more.
            protect(cluster, golden)
            _clone_call(cluster, golden, child)
        outcome = "created"
    except rbd.ImageExists:
        wait_for_same_parent(cluster, child, golden)
        outcome = "raced"
    except (rados.ObjectNotFound, rbd.ImageNotFound):
        golden_size(cluster, golden)  # names the missing golden image or snapshot
        raise ImageNotFound("%s: golden snapshot %s not found" % (what, golden)) from None
    except (rados.Error, rbd.Error) as exc:
        raise translate(exc, what) from None
    if size is not None:
        grow(cluster, child, size)
    log.info("clone %s of %s: %s", child, golden, outcome)
    return outcome


def wait_for_same_parent(cluster, child, golden, settle=CLONE_SETTLE):
    """Succeed once child shows golden as its parent; CloneConflict if it is another image."""
    found = []

    def same_parent():
        try:
            found[:] = [parent_of(cluster, child)]
        except ImageNotFound:
            found[:] = [None]  # the winner is between creating the header and linking the parent
        return found[0] == golden

    deadline.retry(same_parent, what="the clone %s of %s" % (child, golden), cap=settle,
                   interval=SETTLE_STEP, max_interval=SETTLE_STEP,
                   give_up=lambda _waited: CloneConflict("%s already exists and is not a clone of %s%s" % (
                       child, golden, " (its parent is %s)" % found[0] if found and found[0] else "")))


def parent_of(cluster, spec):
    """The image's parent snapshot as an ImageSpec, or None for an image that is no clone."""
    _rados, rbd = bindings()
    with cluster.image(spec.head()) as image:
        try:
            return parent_spec(image.get_parent_image_spec())
        except rbd.ImageNotFound:
            return None
        except rbd.Error as exc:
            raise translate(exc, "parent of %s" % spec) from None


def grow(cluster, spec, size):
    """Resize spec up to size; never shrinks (that would drop data)."""
    _rados, rbd = bindings()
    with cluster.image(spec.head(), read_only=False) as image:
        if image.size() < size:
            try:
                image.resize(size)
            except rbd.Error as exc:
                raise translate(exc, "resizing %s" % spec) from None
            log.info("grew %s to %d bytes", spec, size)


def ensure_clone(cluster, target):
    """clone= on attach: create target.spec from target.clone unless it exists already.

    An existing image is used as it is (a VM's second boot, or a flattened
    clone): only a fresh clone is grown to size=.
    """
    try:
        cluster.check_image(target.spec.head())  # one stat, not an image open
        return "exists"
    except ImageNotFound:
        return clone(cluster, target.clone, target.spec, target.size)


# ---- snapshots ------------------------------------------------------------------

def _op(cluster, spec, what, fn, read_only=False):
    rados, rbd = bindings()
    with cluster.image(spec.head(), read_only=read_only) as image:
        try:
            return fn(image)
        except (rados.Error, rbd.Error) as exc:
            raise translate(exc, what) from None


def snapshot_create(cluster, spec):
    """Snapshot the image; works while it is attached (librbd asks the lock owner)."""
    _rados, rbd = bindings()
    need_snap(spec, "snapshot create")

    def create(image):
        try:
            image.create_snap(spec.snap)
        except rbd.ImageExists:
            raise BlockRbdError("snapshot %s already exists" % spec) from None
    _op(cluster, spec, "creating snapshot %s" % spec, create)


def snapshot_list(cluster, spec):
    def listing(image):
        snaps = list(image.list_snaps())
        for snap in snaps:
            snap.setdefault("timestamp", image.get_snap_timestamp(snap["id"]))
        return snapshot_rows(snaps, {s["name"]: image.is_protected_snap(s["name"]) for s in snaps})
    return _op(cluster, spec, "listing snapshots of %s" % spec.head(), listing, read_only=True)


def snapshot_remove(cluster, spec):
    """Remove a snapshot, unprotecting it first when no clone depends on it."""
    _rados, rbd = bindings()
    need_snap(spec, "snapshot remove")

    def remove(image):
        if not image.snap_exists(spec.snap):
            raise ImageNotFound("snapshot %s does not exist" % spec)
        if image.is_protected_snap(spec.snap):
            try:
                image.unprotect_snap(spec.snap)
            except rbd.ImageBusy:
                raise BlockRbdError("snapshot %s has clones: flatten or remove them first" % spec) from None
        image.remove_snap(spec.snap)
    _op(cluster, spec, "removing snapshot %s" % spec, remove)


def refuse_if_attached(spec, holders, watchers, before="rolling back"):
    """The one "not while attached" error: registered holders and other watchers."""
    users = sorted(holders) + (["watched by %s" % ", ".join(sorted(watchers))] if watchers else [])
    if users:
        raise ImageInUse("%s is attached (%s): detach it before %s" % (spec.head(), ", ".join(users), before))


def _refuse_if_used(cluster, spec, registry, image, before):
    """refuse_if_attached from the registrations and the open image's other watchers."""
    regs, _watchers, _owners = registry.states(cluster, spec.head())
    others = other_watchers(list(image.watchers_list()), cluster.rados.get_instance_id())
    refuse_if_attached(spec, [r.key for r in regs], [w["addr"] for w in others], before)


def rollback(cluster, spec, registry):
    """Roll the image back to spec.snap; refused while it is attached anywhere.

    Rolling back under a user would change a mounted filesystem's blocks.
    Registrations catch attachments that hold no watch (a stale or read-only
    mapping elsewhere); watchers catch every open mapping (krbd, rbd-nbd,
    rbd-fuse) and librbd clients outside block-rbd.
    """
    need_snap(spec, "snapshot rollback")

    def roll(image):
        if not image.snap_exists(spec.snap):
            raise ImageNotFound("snapshot %s does not exist" % spec)
        _refuse_if_used(cluster, spec, registry, image, "rolling back")
        image.rollback_to_snap(spec.snap)
    _op(cluster, spec, "rolling back %s" % spec, roll)


def resize(cluster, spec, size, registry, allow_shrink=False):
    """Set the image's size; returns the size it had.

    Growing is safe under a running guest: krbd and rbd-nbd follow the header
    by themselves, loop devices on rbd-fuse through follow_size (`block-rbd
    resize` here, `block-rbd upkeep` on every host), and blkback passes the
    new size on to the guest.  Shrinking drops the data past the new end: only
    with allow_shrink, and never while the image is attached anywhere.
    """
    if spec.snap:
        raise BlockRbdError("resize: %s is a snapshot; name the image" % spec)

    def change(image):
        old = image.size()
        if size < old:
            _refuse_if_used(cluster, spec, registry, image, "shrinking it")
            if not allow_shrink:
                raise BlockRbdError("shrinking %s from %d to %d bytes drops the data past the new end: "
                                    "refused without --allow-shrink" % (spec, old, size))
        if size != old:
            image.resize(size)
            log.info("resized %s from %d to %d bytes", spec, old, size)
        return old
    return _op(cluster, spec, "resizing %s" % spec, change)


def describe(cluster, spec):
    """Size, features, parent and snapshots of the image (for `block-rbd status`)."""
    _rados, rbd = bindings()

    def facts(image):
        try:
            parent = str(parent_spec(image.get_parent_image_spec()))
        except rbd.ImageNotFound:
            parent = None
        features = rbd.RBD().features_to_string(image.features())
        return {"image": str(spec.head()), "size": image.size(),
                "features": features.split(",") if features else [], "parent": parent,
                "snapshots": [snap["name"] for snap in image.list_snaps()]}
    return _op(cluster, spec, "describing %s" % spec.head(), facts, read_only=True)


def flatten(cluster, spec):
    """Copy the parent's data into the clone so it no longer depends on the golden image."""
    _rados, rbd = bindings()

    def flat(image):
        try:
            image.get_parent_image_spec()
        except rbd.ImageNotFound:
            raise BlockRbdError("%s is not a clone: nothing to flatten" % spec.head()) from None
        image.flatten()
    _op(cluster, spec, "flattening %s" % spec.head(), flat)
