"""Operator commands for cluster-wide access modes: `locks`, `break-lock`, `release-pending`;
the registration view `status` shares."""

import json
import time

import click

from .. import attachments
from ..cluster import Cluster
from ..errors import BlockRbdError
from ..registry import Registry
from ..target import parse
from .console import echo_table, format_option


def registrations(config, cluster, spec):
    """(the image's registrations, oldest first; its watchers; its exclusive-lock owners)."""
    regs, watchers, owners = Registry(config).states(cluster, spec)
    return sorted(regs, key=lambda r: (r.since, r.key)), watchers, owners


def registration_rows(regs):
    """Registrations as JSON rows: the stored record plus key, state and identity."""
    return [dict(r.as_record(), key=r.key, state=r.state, identity=r.identity) for r in regs]


def echo_registrations(spec, regs, watchers):
    if not regs:
        click.echo("%s: no block-rbd attachments" % spec)
    else:
        echo_table([("HOLDER", "MODE", "VM", "DOMID", "DEVID", "CLIENT", "SINCE", "STATE")] + [
            (r.key, r.mode, r.identity, r.domid or "-", r.devid or "-", r.client or "-",
             time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.since)), r.state) for r in regs])
    outside = sorted(set(watchers) - {r.client for r in regs})
    if outside:
        click.echo("watchers outside block-rbd: %s" % ", ".join(outside))


@click.command("locks")
@click.argument("target")
@format_option
@click.pass_obj
def locks_cmd(obj, target, fmt):
    """List every access registration of TARGET, with its holder and liveness."""
    config = obj.config
    spec = parse(target, config["pool"]).spec.head()
    with Cluster(config) as cluster:
        regs, watchers, owners = registrations(config, cluster, spec)
    if fmt == "json":
        click.echo(json.dumps({
            "image": str(spec), "watchers": sorted(watchers), "lock_owners": sorted(owners),
            "registrations": registration_rows(regs)}, indent=2))
        return
    echo_registrations(spec, regs, watchers)


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


@click.command("release-pending")
@click.pass_obj
def release_pending_cmd(obj):
    """Finish the cluster-wide releases that removes without the cluster left pending."""
    config = obj.config
    with Cluster(config) as cluster:
        done, left = attachments.release_pending(config, cluster, Registry(config))
    for item in done:
        click.echo("released %s by %s" % (item.image, item.holder))
    if left:
        raise BlockRbdError("%d release(s) still pending: the cluster did not answer" % len(left))
