"""Operator commands for golden images and snapshots: `snapshot`, `clone`, `flatten`."""

import json

import click

from .. import attachments, images
from ..cluster import Cluster
from ..registry import Registry
from ..target import parse_size, parse_spec
from .console import echo_table, format_option


def image_spec(obj, text, snap=None):
    """Parse an image spec with the configured default pool; snap: True requires one, False forbids."""
    spec = parse_spec(text, obj.config["pool"])
    if snap is True:
        images.need_snap(spec, text)
    elif snap is False and spec.snap:
        raise click.UsageError("%s: name an image, not a snapshot" % text)
    return spec


@click.group("snapshot")
def snapshot_group():
    """Create, list, remove and roll back snapshots (stay inside the cluster)."""


@snapshot_group.command("create")
@click.argument("snapshot")
@click.pass_obj
def snapshot_create_cmd(obj, snapshot):
    """Snapshot POOL/IMAGE@SNAP (also while attached: freeze the guest first for a clean fs)."""
    spec = image_spec(obj, snapshot, snap=True)
    with Cluster(obj.config) as cluster:
        images.snapshot_create(cluster, spec)
    click.echo("created %s" % spec)


@snapshot_group.command("list")
@click.argument("image")
@format_option
@click.pass_obj
def snapshot_list_cmd(obj, image, fmt):
    """List the snapshots of POOL/IMAGE."""
    spec = image_spec(obj, image, snap=False)
    with Cluster(obj.config) as cluster:
        rows = images.snapshot_list(cluster, spec)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    table = [("NAME", "SIZE", "PROTECTED", "TIMESTAMP")] + [
        (r["name"], str(r["size"]), "yes" if r["protected"] else "no", str(r["timestamp"] or "-"))
        for r in rows]
    echo_table(table)


@snapshot_group.command("remove")
@click.argument("snapshot")
@click.pass_obj
def snapshot_remove_cmd(obj, snapshot):
    """Remove POOL/IMAGE@SNAP (unprotecting it when no clone depends on it)."""
    spec = image_spec(obj, snapshot, snap=True)
    with Cluster(obj.config) as cluster:
        images.snapshot_remove(cluster, spec)
    click.echo("removed %s" % spec)


@snapshot_group.command("rollback")
@click.argument("snapshot")
@click.pass_obj
def snapshot_rollback_cmd(obj, snapshot):
    """Roll POOL/IMAGE back to SNAP; refused while the image is attached anywhere."""
    spec = image_spec(obj, snapshot, snap=True)
    with Cluster(obj.config) as cluster:
        images.rollback(cluster, spec, Registry(obj.config))
    click.echo("rolled %s back to %s" % (spec.head(), spec.snap))


@click.command("clone")
@click.argument("golden")
@click.argument("image")
@click.option("--size", default=None, help="Grow the clone to this size (e.g. 20G).")
@click.pass_obj
def clone_cmd(obj, golden, image, size):
    """Clone the snapshot GOLDEN (POOL/IMAGE@SNAP) as IMAGE, copy-on-write."""
    golden_spec = image_spec(obj, golden, snap=True)
    spec = image_spec(obj, image, snap=False)
    with Cluster(obj.config) as cluster:
        outcome = images.clone(cluster, golden_spec, spec, parse_size(size) if size else None)
    click.echo("%s %s from %s" % ("cloned" if outcome == "created" else "already cloned", spec, golden_spec))


@click.command("flatten")
@click.argument("image")
@click.pass_obj
def flatten_cmd(obj, image):
    """Copy the parent's data into the clone IMAGE, detaching it from its golden image."""
    spec = image_spec(obj, image, snap=False)
    with Cluster(obj.config) as cluster:
        images.flatten(cluster, spec)
    click.echo("flattened %s" % spec)


@click.command("resize")
@click.argument("image")
@click.argument("size")
@click.option("--allow-shrink", is_flag=True, help="Allow a smaller size (drops the data past it); "
              "refused while the image is attached anywhere.")
@click.pass_obj
def resize_cmd(obj, image, size, allow_shrink):
    """Set IMAGE's size to SIZE (20G), also under running guests: they see it grow."""
    spec = image_spec(obj, image, snap=False)
    new = parse_size(size)
    with Cluster(obj.config) as cluster:
        old = images.resize(cluster, spec, new, Registry(obj.config), allow_shrink)
    click.echo("resized %s from %d to %d bytes" % (spec, old, new))
    # This host's devices now; other hosts' follow by themselves (krbd, rbd-nbd) or
    # through their `block-rbd upkeep` (loop devices on rbd-fuse).
    for mapping, got in attachments.follow_size(obj.config, spec, new if new > old else None):
        click.echo("%s (%s): %d bytes" % (mapping.device, mapping.mapper, got))
