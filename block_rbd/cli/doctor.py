"""Operator command for this host's readiness: `doctor`."""

import os
import sys

import click


@click.command("doctor")
@click.pass_obj
def doctor_cmd(obj):
    """Check this host: configuration, keyring, cluster, mappers, Xen."""
    from .. import doctor
    from ..xenstore import Xenstore
    config = obj.config
    reachable = os.path.exists("/proc/xen/capabilities") or os.environ.get("XENSTORED_PATH")
    xs = Xenstore(timeout=5) if reachable else None
    results = doctor.run(config, xs)
    for level, message in results:
        click.echo("%-4s  %s" % (level.upper(), message))
    if any(level == doctor.FAIL for level, _ in results):
        sys.exit(1)
