"""Operator commands for live mappings: `upkeep` (a per-host service) and `restart-nbd`."""

import click


@click.command("upkeep")
@click.option("--interval", default=2.0, show_default=True, type=click.FloatRange(0.1),
              help="Seconds between rounds.")
@click.option("--once", is_flag=True, help="One round, then exit.")
@click.pass_obj
def upkeep_cmd(obj, interval, once):
    """Keep this host's disks alive: a new rbd-nbd for a device whose daemon is gone,
    loop devices on rbd-fuse grown with their image (systemd runs it)."""
    from .. import upkeep
    upkeep.run(obj.config, interval, rounds=1 if once else None)


@click.command("restart-nbd")
@click.pass_obj
def restart_nbd_cmd(obj):
    """Replace every rbd-nbd daemon of this host's disks, one at a time, without a
    detach (after an upgrade of Ceph in dom0): guests see a pause, no I/O error.
    Each device has a request timeout for 40 s after, which `block-rbd upkeep` ends."""
    from ..cluster import Cluster
    from ..mappers import nbd
    from ..registry import Registry
    with Cluster(obj.config) as cluster:
        done = nbd.restart(obj.config, cluster, Registry(obj.config))
    for device, old, new in done:
        click.echo("%s: rbd-nbd %s -> %d" % (device, old if old is not None else "(gone)", new))
