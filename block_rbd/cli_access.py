"""Operator commands for cluster-wide access modes: `locks` and `break-lock`."""

import json
import time

import click

from . import attachments, images
from .console import echo_table
from .cluster import Cluster
from .registry import Registry
from .target import parse


@click.command("locks")
@click.argument("target")
@click.option("--format", "fmt", type=click.Choice(["plain", "json"]), default="plain")
@click.pass_obj
def locks_cmd(obj, target, fmt):
    """List every access registration of TARGET, with its holder and liveness."""
    config = obj.config
    spec = parse(target, config["pool"]).spec.head()
    with Cluster(config) as cluster:
        regs, watchers, owners = Registry(config).states(cluster, spec)
    regs = sorted(regs, key=lambda r: (r.since, r.key))
    if fmt == "json":
        click.echo(json.dumps({
            "image": str(spec), "watchers": sorted(watchers), "lock_owners": sorted(owners),
            "registrations": [dict(r.as_record(), key=r.key, state=r.state, identity=r.identity)
                              for r in regs]}, indent=2))
        return
    _echo_registrations(spec, regs, watchers)


def _echo_registrations(spec, regs, watchers):
    if not regs:
        click.echo("%s: no block-rbd attachments" % spec)
    else:
        echo_table([("HOLDER", "MODE", "VM", "DOMID", "DEVID", "CLIENT", "SINCE", "STATE")] + [
            (r.key, r.mode, r.identity, r.domid or "-", r.devid or "-", r.client or "-",
             time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.since)), r.state) for r in regs])
    outside = sorted(set(watchers) - {r.client for r in regs})
    if outside:
        click.echo("watchers outside block-rbd: %s" % ", ".join(outside))


@click.command("status")
@click.argument("target")
@click.option("--format", "fmt", type=click.Choice(["plain", "json"]), default="plain")
@click.pass_obj
def status_cmd(obj, target, fmt):
    """What TARGET is and who uses it: the image, its attachments anywhere, its mappings here."""
    config = obj.config
    spec = parse(target, config["pool"]).spec.head()
    with Cluster(config) as cluster:
        info = images.describe(cluster, spec)
        regs, watchers, _owners = Registry(config).states(cluster, spec)
    regs = sorted(regs, key=lambda r: (r.since, r.key))
    here = [row for row in attachments.host_mappings(config) if row["image"] == str(spec)]
    if fmt == "json":
        click.echo(json.dumps({
            "image": info, "watchers": sorted(watchers), "mapped_here": here,
            "registrations": [dict(r.as_record(), key=r.key, state=r.state, identity=r.identity)
                              for r in regs]}, indent=2))
        return
    click.echo("%s: %d MiB, features %s, parent %s, %d snapshot(s)%s" % (
        spec, info["size"] >> 20, ",".join(info["features"]) or "-", info["parent"] or "-",
        len(info["snapshots"]), ": " + ", ".join(info["snapshots"]) if info["snapshots"] else ""))
    _echo_registrations(spec, regs, watchers)
    for row in here:
        click.echo("mapped on this host: %s %s via %s, used by %s" % (
            row["device"] or "(missing)", row["mode"], row["mapper"],
            ", ".join(row["backends"] + (["manual"] if row["manual"] else [])) or "-"))


@click.command("break-lock")
@click.argument("target")
@click.argument("holder")
@click.option("--no-blocklist", is_flag=True,
              help="Only remove the registration; do not fence its client.")
@click.pass_obj
def break_lock_cmd(obj, target, holder, no_blocklist):
    """Remove HOLDER's access registration of TARGET, blocklisting its client first."""
    config = obj.config
    spec = parse(target, config["pool"]).spec.head()
    with Cluster(config) as cluster:
        reg, fenced = Registry(config).break_lock(cluster, spec, holder, blocklist=not no_blocklist)
    if fenced:
        click.echo("blocklisted client %s (ceph osd blocklist add %s): it can no longer read or write"
                   % (fenced, fenced))
    elif not no_blocklist:
        click.echo("%s had no mapping client address: nothing to blocklist" % holder)
    else:
        click.echo("not blocklisted (--no-blocklist): client %s may still write" % (reg.client or "-"))
    click.echo("removed %s's registration of %s (%s)" % (holder, spec, reg.describe()))
