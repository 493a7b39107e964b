"""Operator commands for backups: `backup` and `restore`."""

import contextlib
import sys

import click

from .. import backup as backup_mod
from ..cluster import Cluster
from .images import image_spec


@contextlib.contextmanager
def _progress(label):
    """A backup.Progress that draws a click progress bar on a terminal, nothing otherwise (cron, logs)."""
    if not sys.stderr.isatty():
        yield backup_mod.Progress()
        return
    bar = click.progressbar(length=1, label=label, file=sys.stderr, show_pos=False, show_percent=True)
    state = {"total": None}

    def callback(count, total):
        if state["total"] != total:
            state["total"] = bar.length = max(total, 1)
        bar.update(count)
    try:
        yield backup_mod.Progress(callback)
    finally:
        bar.render_finish()


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
    spec = image_spec(obj, source)
    with Cluster(obj.config) as cluster, _progress("backup %s" % spec) as progress:
        stats = backup_mod.backup(cluster, spec, dest, fmt, since, verify, progress)
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
    spec = image_spec(obj, image, snap=False)
    with Cluster(obj.config) as cluster, _progress("restore %s" % spec) as progress:
        backup_mod.restore(cluster, full, spec, increments, progress)
    click.echo("restored %s from %s%s" % (spec, full, " + %d increments" % len(increments) if increments else ""))
