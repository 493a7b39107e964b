"""Operator commands for this host's mappings: `map`, `unmap`, `showmapped`, `status`."""

import json
import os

import click

from .. import attachments, deadline, images
from ..cluster import Cluster
from ..errors import BlockRbdError, CorruptRecord
from ..policy import Request
from ..registry import Registry
from ..target import parse
from .access import echo_registrations, registration_rows, registrations
from .console import echo_table, format_option

MANUAL = attachments.MANUAL


@click.command("map")
@click.argument("target")
@click.option("--mode", type=click.Choice(["r", "w", "r!", "w!"]), default="w", show_default=True)
@click.pass_obj
def map_cmd(obj, target, mode):
    """Map TARGET in dom0 without Xen and print the device."""
    config = obj.config
    parsed = parse(target, config["pool"])
    mode = parsed.mode or mode
    # The same budget as a hotplug run: a map that hangs ends, and cleans up, in time.
    with Cluster(config) as cluster, deadline.budget(deadline.Deadline(config["timeouts.hotplug"])):
        mapping = attachments.attach(config, cluster, parsed, Request(MANUAL, mode), Registry(config))
    click.echo(mapping.device)


def _find_device(config, device):
    for record in attachments.local_state(config).records():
        if record.device in (os.path.realpath(device), device):
            return record.spec, record.read_only
    raise BlockRbdError("%s is not a device block-rbd mapped on this host" % device)


@click.command("unmap")
@click.argument("what")
@click.pass_obj
def unmap_cmd(obj, what):
    """Unmap a TARGET or DEVICE that `block-rbd map` mapped."""
    config = obj.config
    if what.startswith("/dev/"):
        candidates = [_find_device(config, what)]
    else:
        spec = parse(what, config["pool"]).spec
        candidates = [(spec, False), (spec, True)]
    held = [(spec, ro) for spec, ro in candidates if MANUAL in _holders(config, spec, ro)]
    if not held:
        others = {h for spec, ro in candidates for h in _holders(config, spec, ro)}
        if others:
            raise BlockRbdError("%s is attached to %s; detach it with xl block-detach"
                                % (what, ", ".join(sorted(others))))
        raise BlockRbdError("%s is not mapped by block-rbd map on this host" % what)
    with Cluster(config) as cluster, deadline.budget(deadline.Deadline(config["timeouts.hotplug"])):
        for spec, ro in held:
            click.echo("%s (%s): %s" % (spec, "ro" if ro else "rw",
                                         attachments.detach(config, cluster, spec, ro, MANUAL,
                                                            Registry(config))))


def _holders(config, spec, ro):
    try:
        return attachments.holders_of(config, spec, ro)
    except CorruptRecord:
        # Named by the operator, its record unreadable: detach unmaps what is mapped
        # (not a device in use) and sets the record aside.
        return {MANUAL}


def _users(row):
    """Who uses a host_mappings() row: its Xen backends, and "manual" for `block-rbd map`."""
    return row["backends"] + (["manual"] if row["manual"] else [])


@click.command("showmapped")
@format_option
@click.pass_obj
def showmapped_cmd(obj, fmt):
    """List this host's RBD mappings and the Xen backends using them."""
    rows = attachments.host_mappings(obj.config)
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("IMAGE", "SNAP", "MODE", "MAPPER", "DEVICE", "USED BY")
    table = [header] + [
        (r["image"], r["snap"] or "-", r["mode"], r["mapper"] or "-", r["device"] or "(missing)",
         ",".join(_users(r)) or
         ("(unreadable record)" if r["corrupt"] else "-" if r["managed"] else "(not block-rbd)"))
        for r in rows if not r["pending_release"] and (r["device"] or not r["corrupt"])]
    echo_table(table)
    for r in rows:
        if r["corrupt"]:
            click.echo(_unreadable(r))
        elif r["pending_release"]:
            click.echo("pending cluster-wide release: %s by %s (block-rbd release-pending)"
                       % (r["image"], ",".join(_users(r))))


def _unreadable(row):
    """The line of a row whose record (or ledger file) cannot be read: what to do about it."""
    if row["pending_release"]:
        return "unreadable ledger file: %s; block-rbd release-pending sets it aside" % row["corrupt"]
    return ("unreadable record: %s; the remove (or unmap) of its disk unmaps what is mapped and sets it aside"
            % row["corrupt"])


@click.command("status")
@click.argument("target")
@format_option
@click.pass_obj
def status_cmd(obj, target, fmt):
    """What TARGET is and who uses it: the image, its attachments anywhere, its mappings here."""
    config = obj.config
    spec = parse(target, config["pool"]).spec.head()
    with Cluster(config) as cluster:
        facts = images.describe(cluster, spec)
        regs, watchers, _owners = registrations(config, cluster, spec)
    here = [row for row in attachments.host_mappings(config) if row["image"] == str(spec)]
    if fmt == "json":
        click.echo(json.dumps({
            "image": facts, "watchers": sorted(watchers), "mapped_here": here,
            "registrations": registration_rows(regs)}, indent=2))
        return
    click.echo("%s: %d MiB, features %s, parent %s, %d snapshot(s)%s" % (
        spec, facts["size"] >> 20, ",".join(facts["features"]) or "-", facts["parent"] or "-",
        len(facts["snapshots"]), ": " + ", ".join(facts["snapshots"]) if facts["snapshots"] else ""))
    echo_registrations(spec, regs, watchers)
    for row in here:
        if row["corrupt"]:
            click.echo(_unreadable(row))
            if not row["device"]:
                continue
        if row["pending_release"]:
            click.echo("cluster-wide release pending on this host for %s" % ", ".join(
                _users(row)))
            continue
        click.echo("mapped on this host: %s %s via %s, used by %s" % (
            row["device"] or "(missing)", row["mode"], row["mapper"],
            ", ".join(_users(row)) or "-"))
