"""Operator commands for golden images, snapshots and backups.

Registered on the main `block-rbd` group when cli.main() imports this module,
so `add`/`remove` under libxl never load it.
"""

import json
import sys

import click

from . import backup as backup_mod
from . import images
from .console import echo_table
from .cluster import Cluster
from .errors import ImageInUse
from .registry import Registry
from .target import parse_size, parse_spec


def _spec(obj, text, snap=None):
    """Parse an image spec with the configured default pool; snap: True requires one, False forbids."""
    spec = parse_spec(text, obj.config["pool"])
    if snap is True:
        images.need_snap(spec, text)
    elif snap is False and spec.snap:
        raise click.UsageError("%s: name an image, not a snapshot" % text)
    return spec


def _progress(label):
    """A click progress bar on a terminal, nothing otherwise (cron, logs)."""
    if not sys.stderr.isatty():
        return None, None
    bar = click.progressbar(length=1, label=label, file=sys.stderr, show_pos=False, show_percent=True)
    state = {"total": None}

    def callback(count, total):
        if state["total"] != total:
            state["total"] = bar.length = max(total, 1)
        bar.update(count)
    return bar, callback


@click.group("snapshot")
def snapshot_group():
    """Create, list, remove and roll back snapshots (stay inside the cluster)."""


@snapshot_group.command("create")
@click.argument("snapshot")
@click.pass_obj
def snapshot_create_cmd(obj, snapshot):
    """Snapshot POOL/IMAGE@SNAP (also while attached: freeze the guest first for a clean fs)."""
    spec = _spec(obj, snapshot, snap=True)
    with Cluster(obj.config) as cluster:
        images.snapshot_create(cluster, spec)
    click.echo("created %s" % spec)


@snapshot_group.command("list")
@click.argument("image")
@click.option("--format", "fmt", type=click.Choice(["plain", "json"]), default="plain")
@click.pass_obj
def snapshot_list_cmd(obj, image, fmt):
    """List the snapshots of POOL/IMAGE."""
    spec = _spec(obj, image, snap=False)
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
    spec = _spec(obj, snapshot, snap=True)
    with Cluster(obj.config) as cluster:
        images.snapshot_remove(cluster, spec)
    click.echo("removed %s" % spec)


@snapshot_group.command("rollback")
@click.argument("snapshot")
@click.pass_obj
def snapshot_rollback_cmd(obj, snapshot):
    """Roll POOL/IMAGE back to SNAP; refused while the image is attached anywhere."""
    spec = _spec(obj, snapshot, snap=True)
    with Cluster(obj.config) as cluster:
        # Registrations catch attachments that hold no watch (e.g. a stale or
        # read-only mapping elsewhere); watchers catch clients outside block-rbd.
        regs, _watchers, _owners = Registry(obj.config).states(cluster, spec.head())
        if regs:
            raise ImageInUse("%s is attached (%s): detach it before rolling back"
                                    % (spec.head(), ", ".join(sorted(r.key for r in regs))))
        images.rollback(cluster, spec)
    click.echo("rolled %s back to %s" % (spec.head(), spec.snap))


@click.command("clone")
@click.argument("golden")
@click.argument("image")
@click.option("--size", default=None, help="Grow the clone to this size (e.g. 20G).")
@click.pass_obj
def clone_cmd(obj, golden, image, size):
    """Clone the snapshot GOLDEN (POOL/IMAGE@SNAP) as IMAGE, copy-on-write."""
    golden_spec = _spec(obj, golden, snap=True)
    spec = _spec(obj, image, snap=False)
    with Cluster(obj.config) as cluster:
        outcome = images.clone(cluster, golden_spec, spec, parse_size(size) if size else None)
    click.echo("%s %s from %s" % ("cloned" if outcome == "created" else "already cloned", spec, golden_spec))


@click.command("flatten")
@click.argument("image")
@click.pass_obj
def flatten_cmd(obj, image):
    """Copy the parent's data into the clone IMAGE, detaching it from its golden image."""
    spec = _spec(obj, image, snap=False)
    with Cluster(obj.config) as cluster:
        images.flatten(cluster, spec)
    click.echo("flattened %s" % spec)


@click.command("backup")
@click.argument("source")
@click.argument("dest", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=click.Choice(["raw", "qcow2"]), default="raw", show_default=True)
@click.option("--since", default=None, metavar="SNAP",
              help="Write only the changes since SNAP, as an rbd diff v1 stream.")
@click.option("--verify", is_flag=True, help="Read the backup back and compare it with the snapshot.")
@click.pass_obj
def backup_cmd(obj, source, dest, fmt, since, verify):
    """Back up POOL/IMAGE@SNAP (or a live POOL/IMAGE, through a temporary snapshot) to DEST."""
    spec = _spec(obj, source)
    bar, callback = _progress("backup %s" % spec)
    with Cluster(obj.config) as cluster:
        try:
            stats = backup_mod.backup(cluster, spec, dest, fmt, since, verify,
                                      backup_mod.Progress(callback))
        finally:
            if bar is not None:
                bar.render_finish()
    click.echo("%s: %d bytes of data written (image %d bytes)%s" % (
        dest, stats["written"], stats["size"], ", verified" if verify else ""))


@click.command("restore")
@click.argument("full", type=click.Path(exists=True, dir_okay=False))
@click.argument("image")
@click.option("--increment", "increments", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="An incremental backup to apply, oldest first (repeat).")
@click.pass_obj
def restore_cmd(obj, full, image, increments):
    """Create IMAGE from the full backup FULL (RAW or QCOW2) plus increments."""
    spec = _spec(obj, image, snap=False)
    bar, callback = _progress("restore %s" % spec)
    with Cluster(obj.config) as cluster:
        try:
            backup_mod.restore(cluster, full, spec, increments, backup_mod.Progress(callback))
        finally:
            if bar is not None:
                bar.render_finish()
    click.echo("restored %s from %s%s" % (spec, full, " + %d increments" % len(increments) if increments else ""))
