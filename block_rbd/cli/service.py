"""`block-rbd service`: the per-host service hotplug runs are sent to."""

import sys

import click


@click.command("service")
@click.option("--socket", "socket_path", default=None,
              help="Listen here when systemd passes no socket (default /run/block-rbd/hotplug.sock, "
                   "or $BLOCK_RBD_SOCKET).")
@click.option("--idle", default=120, show_default=True, type=click.IntRange(1),
              help="Exit after this many seconds without a request.")
def service_cmd(socket_path, idle):
    """Serve hotplug runs with one shared cluster connection (systemd starts it on demand)."""
    from ..service import main as service_main
    sys.exit(service_main(socket_path, idle))


@click.command("adopt-daemons")
def adopt_daemons_cmd():
    """Move rbd-nbd/rbd-fuse daemons out of block-rbd's units into scopes (the upgrade from 0.1.0 runs it)."""
    from ..scopes import adopt_all
    for pid, image, unit in adopt_all():
        click.echo("rbd daemon %d serving %s: now in %s" % (pid, image, unit))
