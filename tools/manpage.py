#!/usr/bin/python3
"""Write block-rbd(8) from the command line's own help (click), so the two never disagree.

    python3 tools/manpage.py > block-rbd.8

The Debian package builds its man page with this; the date comes from SOURCE_DATE_EPOCH
(the changelog's date under dpkg-buildpackage), so the page is reproducible.
"""

import os
import sys
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from block_rbd import __version__  # noqa: E402
from block_rbd.cli import cli  # noqa: E402

NAME = "block-rbd"


def roff(text):
    """Text as roff: backslashes, leading dots/quotes and hyphens escaped."""
    out = []
    for line in text.replace("\\", "\\e").splitlines():
        line = line.replace("-", "\\-")
        if line.startswith((".", "'")):
            line = "\\&" + line
        out.append(line)
    return "\n".join(out)


def paragraphs(text):
    """click's help text as roff paragraphs (blank lines separate them)."""
    text = click.unstyle(text or "").strip()
    blocks = [b.strip() for b in text.split("\n\n") if b.strip()]
    return "\n.PP\n".join(roff(" ".join(b.split()) if "\b" not in b else b.replace("\b\n", ""))
                          for b in blocks)


def options(ctx, command, with_help=False):
    lines = []
    for param in command.get_params(ctx):
        if param.name == "help" and not with_help:
            continue  # every command has it; OPTIONS says it once
        record = param.get_help_record(ctx)
        if not record:
            continue
        names, help_text = record
        lines.append(".TP\n.B %s\n%s" % (roff(names), roff(" ".join(help_text.split()))))
    return "\n".join(lines)


def walk(ctx, command, path):
    """(path, command, ctx) for `command` and every subcommand below it, in name order."""
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name in sorted(command.list_commands(ctx)):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            yield from walk(click.Context(sub, info_name=name, parent=ctx), sub, path + [name])


def page():
    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", time.time()))
    date = time.strftime("%Y-%m-%d", time.gmtime(epoch))
    root = click.Context(cli, info_name=NAME)
    out = ['.TH BLOCK\\-RBD 8 "%s" "%s %s" "System Administration"' % (date, NAME, __version__),
           ".SH NAME",
           "block\\-rbd \\- Ceph RBD images as Xen disks: hotplug script and operator tool",
           ".SH SYNOPSIS",
           ".B block\\-rbd",
           "[\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]...",
           ".br",
           ".B /etc/xen/scripts/block\\-rbd",
           "\\fBadd\\fR|\\fBremove\\fR (run by libxl for a disk with \\fBscript=block\\-rbd\\fR)",
           ".SH DESCRIPTION",
           paragraphs(cli.help),
           ".PP",
           "A Xen disk names it in the domain's configuration, for example",
           ".PP",
           ".RS",
           ".nf",
           "disk = [ 'script=block\\-rbd,vdev=xvda,target=rbd:vm1' ]",
           ".fi",
           ".RE",
           ".SH OPTIONS",
           options(root, cli, with_help=True),
           ".SH COMMANDS"]
    for path, command, ctx in list(walk(root, cli, []))[1:]:
        usage = " ".join(command.collect_usage_pieces(ctx))
        out += [".SS \"%s\"" % roff(" ".join(path)),
                ".B block\\-rbd %s" % roff(" ".join(path)),
                roff(usage),
                ".PP",
                paragraphs(command.help)]
        opts = options(ctx, command)
        if opts:
            out.append(opts)
    out += [".SH FILES",
            ".TP", ".I /etc/xen/block\\-rbd.yaml", "The configuration: cluster, cephx user, mapper, "
            "access modes, time budgets.",
            ".TP", ".I /etc/xen/scripts/block\\-rbd", "The hotplug script libxl runs.",
            ".TP", ".I /var/log/xen/xen\\-hotplug.log", "One line per event, beside Xen's own.",
            ".SH SEE ALSO",
            ".BR xl (1),", ".BR xl\\-disk\\-configuration (5),", ".BR rbd (8),", ".BR rbd\\-nbd (8)",
            ".PP", "/usr/share/doc/block\\-rbd/README.rst"]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.stdout.write(page())
