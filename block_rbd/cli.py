"""The operator command line: `block-rbd COMMAND`.

`add`/`remove` under libxl never come here (scripts/block-rbd sends them
straight to hotplug.py, without importing click).
"""

import json
import logging
import os
import shutil
import sys

import click

from . import attachments, cli_access, cli_images
from . import config as config_mod
from . import log as log_mod
from . import process
from .cluster import Cluster
from .console import echo_table
from .errors import BlockRbdError
from .policy import Request
from .registry import Registry
from .target import parse, parse_spec

log = logging.getLogger("block-rbd")
MANUAL = attachments.MANUAL


class Context:
    def __init__(self, config_path, verbose):
        self.config_path = config_path
        self.verbose = verbose
        self._config = None

    @property
    def config(self):
        if self._config is None:
            self._config = config_mod.load(self.config_path)
            log_mod.setup(self._config["log.file"], self._config["log.syslog"],
                          self.verbose or self._config["log.verbose"],
                          stderr_level=logging.INFO if self.verbose else logging.WARNING)
        return self._config


class Group(click.Group):
    """Turns every BlockRbdError into one line on stderr and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BlockRbdError as exc:
            log.error("%s", exc)  # the log's stderr handler prints "block-rbd: <message>"
            sys.exit(1)


@click.group(cls=Group)
@click.option("--config", "config_path", envvar=config_mod.ENV_VAR, default=None,
              help="Configuration file (default /etc/xen/block-rbd.yaml).")
@click.option("--verbose", "-v", is_flag=True, help="Log every step to stderr.")
@click.pass_context
def cli(ctx, config_path, verbose):
    """Ceph RBD images as Xen disks."""
    process.fix_path()
    log_mod.set_context("")
    log_mod.setup(None, False, verbose)
    ctx.obj = Context(config_path, verbose)


@cli.command("add")
def add_cmd():
    """Run the hotplug `add` (needs XENBUS_PATH, as libxl sets it)."""
    from .hotplug import main as hotplug_main
    sys.exit(hotplug_main("add"))


@cli.command("remove")
def remove_cmd():
    """Run the hotplug `remove` (needs XENBUS_PATH, as libxl sets it)."""
    from .hotplug import main as hotplug_main
    sys.exit(hotplug_main("remove"))


@cli.command("map")
@click.argument("target")
@click.option("--mode", type=click.Choice(["r", "w", "r!", "w!"]), default="w", show_default=True)
@click.pass_obj
def map_cmd(obj, target, mode):
    """Map TARGET in dom0 without Xen and print the device."""
    config = obj.config
    parsed = parse(target, config["pool"])
    mode = parsed.mode or mode
    with Cluster(config) as cluster:
        mapping = attachments.attach(config, cluster, parsed, Request(MANUAL, mode), Registry(config))
    click.echo(mapping.device)


def _find_device(config, device):
    for record in attachments.local_state(config).records():
        if record.device in (os.path.realpath(device), device):
            return record.spec, record.read_only
    raise BlockRbdError("%s is not a device block-rbd mapped on this host" % device)


@cli.command("unmap")
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
    held = [(spec, ro) for spec, ro in candidates if MANUAL in attachments.holders_of(config, spec, ro)]
    if not held:
        others = {h for spec, ro in candidates for h in attachments.holders_of(config, spec, ro)}
        if others:
            raise BlockRbdError("%s is attached to %s; detach it with xl block-detach"
                                % (what, ", ".join(sorted(others))))
        raise BlockRbdError("%s is not mapped by block-rbd map on this host" % what)
    with Cluster(config) as cluster:
        for spec, ro in held:
            click.echo("%s (%s): %s" % (spec, "ro" if ro else "rw",
                                         attachments.detach(config, cluster, spec, ro, MANUAL,
                                                            Registry(config))))


@cli.command("showmapped")
@click.option("--format", "fmt", type=click.Choice(["plain", "json"]), default="plain")
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
         ",".join(r["backends"] + (["manual"] if r["manual"] else [])) or
         ("-" if r["managed"] else "(not block-rbd)"))
        for r in rows]
    echo_table(table)


@cli.command("doctor")
@click.pass_obj
def doctor_cmd(obj):
    """Check this host: configuration, keyring, cluster, mappers, Xen."""
    from . import doctor
    from .xenstore import Xenstore
    config = obj.config
    reachable = os.path.exists("/proc/xen/capabilities") or os.environ.get("XENSTORED_PATH")
    xs = Xenstore() if reachable and shutil.which("xenstore-ls") else None
    results = doctor.run(config, xs)
    for level, message in results:
        click.echo("%-4s  %s" % (level.upper(), message))
    if any(level == doctor.FAIL for level, _ in results):
        sys.exit(1)


# Commands kept in modules of their own, by theme.
for _command in (cli_access.status_cmd, cli_access.locks_cmd, cli_access.break_lock_cmd,
                 cli_images.snapshot_group,
                 cli_images.clone_cmd, cli_images.flatten_cmd, cli_images.backup_cmd,
                 cli_images.restore_cmd):
    cli.add_command(_command)


def main():
    cli(prog_name="block-rbd")
