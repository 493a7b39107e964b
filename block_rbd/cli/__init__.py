"""The operator command line: `block-rbd COMMAND`, one module per command group.

`add`/`remove` under libxl never come here (scripts/block-rbd sends them
straight to hotplug.py, without importing click).
"""

import logging
import sys

import click

from .. import config as config_mod
from .. import log as log_mod
from .. import process
from ..errors import BlockRbdError
from . import access, backup, doctor, images, maps, service, upkeep

log = logging.getLogger("block-rbd")


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
    from ..hotplug import main as hotplug_main
    sys.exit(hotplug_main("add"))


@cli.command("remove")
def remove_cmd():
    """Run the hotplug `remove` (needs XENBUS_PATH, as libxl sets it)."""
    from ..hotplug import main as hotplug_main
    sys.exit(hotplug_main("remove"))


# The command groups, each in a module of its own.
for _command in (maps.map_cmd, maps.unmap_cmd, maps.showmapped_cmd, maps.status_cmd,
                 access.locks_cmd, access.break_lock_cmd, access.release_pending_cmd,
                 images.snapshot_group, images.clone_cmd, images.flatten_cmd, images.resize_cmd,
                 backup.backup_cmd, backup.restore_cmd,
                 doctor.doctor_cmd, service.service_cmd, service.adopt_daemons_cmd,
                 upkeep.upkeep_cmd, upkeep.restart_nbd_cmd):
    cli.add_command(_command)


def main():
    cli(prog_name="block-rbd")
