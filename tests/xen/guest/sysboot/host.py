"""Smoke program of the systemd dom0 (tests/xen/sysdom0.py): one machine booted from its
disk under the host's control: boot, checks, `systemctl reboot`, a power cut, poweroff.

Each step is one result; the commands and outputs are in <workdir>/sysboot.log.
BRBD_SYSBOOT_DEB=/path/block-rbd_*.deb: the package goes into the disk by apt (ctx.debs)
and step `block-rbd-units` checks that its socket, upkeep and timer are active.
"""

import os
import re

from sysdrive import Driver, Failed, count_boots  # noqa: F401 (count_boots: the unit test's)

BOOT = "systemd"
MACHINES = ["a"]
BOOT_TIMEOUT = 420
DOWN_TIMEOUT = 180

CONNECT = """
import rados, sys
c = rados.Rados(conffile="/etc/ceph/ceph.conf", rados_id=sys.argv[1], conf={"keyring": sys.argv[2]})
c.connect(timeout=30)
io = c.open_ioctx(sys.argv[3])
print("connected, fsid", c.get_fsid(), "pool", sys.argv[3], "objects listed", sum(1 for _ in io.list_objects()))
io.close(); c.shutdown()
"""


def prepare(ctx):
    deb = os.environ.get("BRBD_SYSBOOT_DEB")
    if deb:
        ctx.debs = [os.path.abspath(deb)]


def drive(ctx):
    d = Driver(ctx, "a", "sysboot.log")
    sh, step = d.sh, d.step

    def boot(n):
        secs = ctx.boot("a", BOOT_TIMEOUT)
        return "QEMU start -> agent ready %.1f s" % secs

    def pid1():
        exe = sh("readlink /proc/1/exe")
        if not exe.endswith("/systemd"):
            raise Failed("PID 1 is %s" % exe)
        return exe

    def running():
        state = sh("timeout 240 systemctl is-system-running --wait", timeout=260, ok=False)
        failed = sh("systemctl --failed --no-legend --plain | awk '{print $1}'", ok=False)
        since = sh("systemd-analyze 2>/dev/null | head -1", ok=False)
        if state.splitlines()[-1:] != ["running"]:
            raise Failed("system %s; failed units: %s" % (state.replace("\n", " "), failed.replace("\n", " ") or "none"))
        return "running; %s" % since

    def xl():
        info = sh("xl info")
        sh("xl list")
        ver = [ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith(("xen_version", "xen_major"))]
        return "xl info/list ok, xen %s" % " ".join(ver)

    def xenstored():
        pid = sh("pidof xenstored || pidof oxenstored")
        dom = sh("xenstore-read domid")
        return "xenstored pid %s, dom0 domid %s; units: %s" % (pid, dom, sh(
            "systemctl list-units --no-legend --plain 'xen*' | awk '{print $1 \"=\" $3}' | tr '\\n' ' '", ok=False))

    def network():
        online = sh("systemctl is-active network-online.target")
        addr = sh("ip -4 -o addr show eth0 | awk '{print $4}'")
        c = ctx.config
        got = sh("timeout 90 python3 -c '%s' %s %s %s" % (CONNECT.replace("'", "'\\''"), c["BRBD_ID"],
                                                          c["BRBD_KEYRING"], c["BRBD_POOL"]), timeout=100)
        return "network-online %s, eth0 %s; %s" % (online, addr, got.splitlines()[-1])

    def units():
        names = "block-rbd.socket block-rbd-upkeep.service block-rbd-release-pending.timer"
        state = sh("systemctl is-active %s" % names, ok=False)
        if state.split() != ["active"] * 3:
            raise Failed("%s: %s" % (names, state.replace("\n", " ")))
        return "%s active; %s" % (names, sh("dpkg-query -W block-rbd"))

    def reboot():
        return "systemctl reboot -> QEMU exit %.1f s" % d.power("reboot", DOWN_TIMEOUT)

    def cut():
        ctx.power_cut("a")
        return "QEMU killed (power loss)"

    def after_cut():
        boots = count_boots(sh("journalctl --list-boots --no-pager"))
        fsck = sh("journalctl -b -o cat --no-pager | grep -iE 'EXT4-fs \\(vda\\).*(recover|orphan)|fsck' | head -3", ok=False)
        return "journal has %d boots; root fs: %s" % (boots, fsck.replace("\n", " | ") or "nothing logged")

    def poweroff():
        return "systemctl poweroff -> QEMU exit %.1f s" % d.power("poweroff", DOWN_TIMEOUT)

    def journal():
        # boot 2 ended in the power cut: journald had not synced (SyncIntervalSec, 5 min)
        # and that boot's lines may be gone; boots 1 and 3 ended cleanly and must be there
        text = ctx.journal("a", "brbd-agent")
        per_boot = [part.count("listening on") for part in re.split(r"-- Boot [0-9a-f]+ --", text)]
        boots = count_boots(ctx.journal("a", args=["--list-boots"]))
        with open(os.path.join(ctx.workdir, "journal-a.txt"), "w") as fh:
            fh.write(ctx.journal("a"))
        ups = sum(per_boot)
        if ups < 2 or boots < 2:
            raise Failed("agent started %d times in the journal over %d boots, wanted the clean boots 1 and 3"
                         % (ups, boots))
        return "read from the disk: %d boots (%s), the agent up %d times%s" % (
            boots, "the power-cut boot lost" if boots == 2 else "all three", ups,
            "" if ups >= 3 else " (the power-cut boot's lines lost)")

    try:
        if not step("boot-1", lambda: boot(1)):
            return d.results
        for name, func in (("pid1-systemd", pid1), ("system-running", running), ("xl", xl),
                           ("xenstored", xenstored), ("network-cluster", network)):
            step(name, func)
        if ctx.debs:
            step("block-rbd-units", units)
        if step("reboot", reboot) and step("boot-2", lambda: boot(2)):
            step("power-cut", cut)
            if step("boot-3", lambda: boot(3)):
                step("after-power-cut", after_cut)
                step("poweroff", poweroff)
                step("journal", journal)
    finally:
        d.close()
    return d.results
