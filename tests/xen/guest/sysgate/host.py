"""The systemd dom0 gate: a Debian dom0 booted from its disk (PID 1 systemd), block-rbd
installed by apt, four PV guests in /etc/xen/auto (krbd and nbd disks, w and r) started
and saved by xendomains, driven from the host through the dom0's agent.  One machine;
every step is one result.  The w guests write numbered, fsync'd 4 KiB blocks all along
(guest-init's serve mode); the host counts them in Ceph through librbd.

Steps (commands and outputs in <workdir>/sysgate.log):
  install-boot      apt installed the .deb before the first boot; the system comes up
                    `running`, block-rbd's socket, upkeep and timer active
  xendomains-start  xendomains started the four guests; every add went through the
                    socket-activated service, one journal line per event; the w guests'
                    writes arrive in Ceph, the r disks are registered r
  nbd-scope         each rbd-nbd daemon runs in a block-rbd-nbd-*.scope of its own
  nbd-heal          the w guest's rbd-nbd killed: upkeep attaches a new one (in a new
                    scope); the guest's writes go on (its longest pause measured)
  units-killed      `systemctl kill -s KILL` of the service and upkeep: systemd brings
                    upkeep back, the socket stays, the daemons and the guests go on
  adopt-daemons     the rbd-nbd daemon put back into upkeep's cgroup (where 0.1.0 left
                    its daemons): `block-rbd adopt-daemons` (the upgrade's postinst)
                    moves it into a scope; upkeep's restart leaves it running
  upgrade           apt installs a newer build with the guests writing: the units
                    restart, every rbd-nbd daemon stays, registrations unchanged, no
                    write error; the guests' longest pause is measured from the host
  reboot-restore    `systemctl reboot`: xendomains saves the guests, block-rbd releases
                    every disk before the network goes (the host sees no registration
                    and no watcher while dom0 is down); at boot xendomains restores
                    them, their disks attach again, their writes go on, data intact
  power-cut         QEMU killed: the registrations stay in Ceph; at boot
                    block-rbd-release-pending releases them before xendomains starts
                    the guests again: no attach refused, no break-lock, no fencing
  package-remove    `apt-get remove`, then `apt-get purge`, with the guests writing: both
                    name the disks they leave mapped, purge keeps the ledger that still
                    holds their registrations; nothing is unmapped; then the package goes
                    back on (and its configuration, as an operator would put it back)
  poweroff          `systemctl poweroff` with the guests running: xendomains saves them,
                    every disk is released; QEMU ends within 120 s
  nothing-left      (verify) no watcher and no registration on the guests' images
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

from sysdrive import Driver, Failed

BOOT = "systemd"
MACHINES = ["a"]
BOOT_TIMEOUT = 420
DOWN_TIMEOUT = 300     # a reboot saves four guests first
POWEROFF_WITHIN = 120  # the bound for `systemctl poweroff` with guests running
HERE = os.path.dirname(os.path.abspath(__file__))
XEN_TESTS = os.path.dirname(os.path.dirname(HERE))
REPO = os.path.dirname(os.path.dirname(XEN_TESTS))
# guest (= its image) -> (access, target options)
GUESTS = {"sd-krbd": ("rw", ""), "sd-nbd": ("rw", ",mapper=nbd"),
          "sd-ro-krbd": ("ro", ""), "sd-ro-nbd": ("ro", ",mapper=nbd")}
WRITERS = sorted(n for n, (access, _o) in GUESTS.items() if access == "rw")
IMAGE_MB = 64
STATS_BLOCK = 16000    # guest-init's serve mode: its failed writes' count
UPGRADE_DEB = "/var/tmp/block-rbd-upgrade.deb"
CONFIG = "/etc/xen/block-rbd.yaml"
APT = ("DEBIAN_FRONTEND=noninteractive apt-get -y -q -o Dpkg::Options::=--force-confdef "
       "-o Dpkg::Options::=--force-confold")


def _gate():
    """The one-host gate's host.py (the guest's initramfs, the images' fill)."""
    spec = importlib.util.spec_from_file_location("brbd_gate_host", os.path.join(
        os.path.dirname(HERE), "gate", "host.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# Per guest image: blocks the guest wrote (leading 4 KiB blocks holding its markers, as
# guest-init's serve mode writes them), watchers, block-rbd registrations.
PROGRESS = r"""
import json, sys, rados, rbd
conf, keyring, pool = sys.argv[1:4]
STATS = 16000
c = rados.Rados(conffile=conf, rados_id="admin", conf={"keyring": keyring})
c.connect(timeout=30)
io = c.open_ioctx(pool)
out = {}
for name in sys.argv[4:]:
    with rbd.Image(io, name, read_only=True) as im:
        n, chunk = 0, 256
        while n < 8192:
            data = im.read(n * 4096, chunk * 4096)
            for i in range(chunk):
                want = ("BRBD-STALL %s %06d\n" % (name, n)).encode().ljust(4096, b"\0")
                if data[i * 4096:(i + 1) * 4096] != want:
                    break
                n += 1
            else:
                continue
            break
        stats = im.read(STATS * 4096, 64).split(b"\n")[0].decode("ascii", "replace")
        errors = int(stats.split("errors=")[1]) if stats.startswith("BRBD-SERVE-STATS ") else None
        watchers = len(list(im.watchers_list()))
        with rados.ReadOpCtx() as op:
            items, _ret = io.get_omap_vals(op, "", "block-rbd.access.", 1000)
            io.operate_read_op(op, "rbd_header." + im.id())
            regs = [k for k, _v in items]
    out[name] = {"blocks": n, "errors": errors, "watchers": watchers, "registrations": regs}
print(json.dumps(out))
"""


# Run beside a step: each w guest's block count in Ceph twice a second, until the file
# argv[4] appears; then the longest time between two polls that saw each count move (the
# pause the guest saw, to within a poll: about 0.5 s plus the reads).
WATCH = r"""
import json, os, sys, time, rados, rbd
conf, keyring, pool, stop = sys.argv[1:5]
c = rados.Rados(conffile=conf, rados_id="admin", conf={"keyring": keyring})
c.connect(timeout=30)
io = c.open_ioctx(pool)
images = {name: rbd.Image(io, name, read_only=True) for name in sys.argv[5:]}

def count(name, im):
    lo, hi = 0, 8192
    while lo < hi:
        mid = (lo + hi) // 2
        want = ("BRBD-STALL %s %06d\n" % (name, mid)).encode().ljust(4096, b"\0")
        lo, hi = (mid + 1, hi) if im.read(mid * 4096, 4096) == want else (lo, mid)
    return lo

state = {n: [count(n, im), time.monotonic(), 0.0] for n, im in images.items()}
while not os.path.exists(stop):
    time.sleep(0.5)
    for n, im in images.items():
        now, t = count(n, im), time.monotonic()
        last = state[n]
        last[2] = max(last[2], t - last[1])  # since the count last moved: a poll apart at least
        if now != last[0]:
            last[0], last[1] = now, t
print(json.dumps({n: {"blocks": v[0], "longest_pause": round(v[2], 1)} for n, v in state.items()}))
"""


class Watch:
    """WATCH in the background for as long as a step takes."""

    def __init__(self, ctx, name):
        info = ctx.info
        self.stop = os.path.join(ctx.workdir, "sysgate", "watch-%s.stop" % name)
        if os.path.exists(self.stop):
            os.unlink(self.stop)
        argv = ctx.harness.ns.exec_argv(["/usr/bin/python3", "-c", WATCH, info["conf"], info["admin_keyring"],
                                         ctx.pool, self.stop] + WRITERS)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def result(self):
        open(self.stop, "w").close()
        out, err = self.proc.communicate(timeout=120)
        if self.proc.returncode != 0:
            raise Failed("the host's watch of the guests' writes failed: %s" % err.strip()[-300:])
        return json.loads(out.strip().splitlines()[-1])


def progress(ctx):
    p = ctx.admin_python(PROGRESS, sorted(GUESTS), timeout=120)
    if p.returncode != 0:
        raise Failed("reading the guests' images through librbd failed: %s" % p.stderr.strip()[-300:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def upgrade_deb(deb, work):
    """The same package with a newer version (a second build, as an upgrade brings)."""
    tree = os.path.join(work, "upgrade-deb")
    shutil.rmtree(tree, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-R", deb, tree], check=True, timeout=120)
    control = os.path.join(tree, "DEBIAN", "control")
    with open(control) as fh:
        text = fh.read()
    version = next(line.split(":", 1)[1].strip() for line in text.splitlines()
                   if line.startswith("Version:"))
    newer = version + "+gate1"
    with open(control, "w") as fh:
        fh.write(text.replace("Version: %s\n" % version, "Version: %s\n" % newer))
    out = os.path.join(work, "block-rbd_%s_all.deb" % newer)
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", tree, out], check=True, timeout=120,
                   stdout=subprocess.DEVNULL)
    shutil.rmtree(tree)
    return version, newer, out


def guest_config(name, kver, pool, options, access="rw"):
    return ('# written by tests/xen/guest/sysgate/host.py\n'
            'name = "%s"\ntype = "pv"\ntsc_mode = "native"\n'
            'kernel = "/boot/vmlinuz-%s"\nramdisk = "/brbd/guest/initrd.gz"\n'
            'extra = "console=hvc0 quiet brbd_mode=serve brbd_disks=xvda:%s%s"\n'
            'memory = 128\nvcpus = 1\n'
            "disk = [ 'format=raw,vdev=xvda,access=%s,script=block-rbd,target=%s/%s%s' ]\n"
            % (name, kver, name, " brbd_ro=1" if access == "ro" else "", access, pool, name, options))


def prepare(ctx):
    gate = _gate()
    work = os.path.join(ctx.workdir, "sysgate")
    os.makedirs(work, exist_ok=True)
    sys.path.insert(0, XEN_TESTS)
    import build_dom0
    deb = build_dom0.build_package(REPO)
    ctx.debs = [deb]
    old, new, newer_deb = upgrade_deb(deb, work)
    ctx.config["BRBD_VERSIONS"] = "%s %s" % (old, new)
    with open(newer_deb, "rb") as fh:
        ctx.files[UPGRADE_DEB] = (fh.read(), 0o644)
    gate.fill_images(ctx, work, {name: (IMAGE_MB << 20, []) for name in GUESTS})
    root = ctx.image["root"]
    ctx.files["/brbd/guest/initrd.gz"] = gate.guest_initrd(ctx, busybox_root=root, kernel_root=root)
    for name, (access, options) in GUESTS.items():
        ctx.files["/etc/xen/auto/%s.cfg" % name] = guest_config(
            name, ctx.image["kver"], ctx.pool, options, access).encode()
    config = gate.dom0_config(ctx, host=None, syslog=True).encode()
    ctx.files[CONFIG] = (config, 0o644)
    ctx.files["/var/tmp/block-rbd.yaml"] = (config, 0o644)  # the operator's copy, for after purge


def drive(ctx):
    d = Driver(ctx, "a", "sysgate.log")
    sh, step = d.sh, d.step
    old, new = ctx.config["BRBD_VERSIONS"].split()
    seen = {}    # w guest's image -> blocks the host last counted
    daemon = {}  # "nbd": (scope unit, pid) of the w guest's rbd-nbd

    def boot():
        secs = ctx.boot("a", BOOT_TIMEOUT)
        state = sh("timeout 240 systemctl is-system-running --wait", timeout=260, ok=False)
        if state.splitlines()[-1:] != ["running"]:
            failed = sh("systemctl --failed --no-legend --plain | awk '{print $1}'", ok=False)
            raise Failed("system %s after boot; failed units: %s"
                         % (state.replace("\n", " "), failed.replace("\n", " ") or "none"))
        return secs

    def running_guests():
        return {line.split()[0] for line in sh("xl list", ok=False).splitlines()[1:] if line.split()}

    def all_running():
        return set(GUESTS) <= running_guests()

    def connected(since):
        """All four guests up, and their disks attached (showmapped) and registered in
        Ceph with their modes: seconds from `since`."""
        d.wait_for("xendomains running the four guests", all_running, 240)
        d.wait_for("the four disks in block-rbd showmapped",
                   lambda: all(n in sh("block-rbd showmapped", ok=False) for n in GUESTS), 60)
        now = progress(ctx)
        unregistered = [n for n in GUESTS if not now[n]["registrations"]]
        if unregistered:
            raise Failed("no registration in Ceph for %s" % unregistered)
        return time.time() - since

    def writes_go_on(label, timeout=150):
        """Each w guest's block count in Ceph grows past what the host saw last, and the
        guest counted no failed write."""
        before = dict(seen)

        def grown():
            now = progress(ctx)
            return now if all(now[n]["blocks"] > before.get(n, 0) for n in WRITERS) else None
        now = d.wait_for("%s: the guests' writes reaching Ceph (last seen %s)" % (label, before), grown, timeout, 3)
        errors = {n: now[n]["errors"] for n in WRITERS if now[n]["errors"] != 0}
        if errors:
            raise Failed("%s: the guests counted failed writes: %s" % (label, errors))
        seen.update({n: now[n]["blocks"] for n in WRITERS})
        return ", ".join("%s %d blocks" % (n, now[n]["blocks"]) for n in WRITERS)

    def nbd_daemons():
        """{scope unit: pid} of the rbd-nbd daemons in block-rbd-nbd scopes: the process
        rbd-nbd forked and init adopted (its parent waits until it serves); None while a
        scope holds anything else (a map or attach in progress)."""
        out = sh("for u in $(systemctl list-units --type=scope --state=running --no-legend --plain "
                 "'block-rbd-nbd-*' | awk '{print $1}'); do for p in $(cat /sys/fs/cgroup/system.slice/$u/cgroup.procs); "
                 "do echo $u $p $(cat /proc/$p/comm) $(awk '{print $4}' /proc/$p/stat) $(tr '\\0' ' ' < /proc/$p/cmdline); "
                 "done; done", ok=False)
        rows = [line.split() for line in out.splitlines()]
        if any(r[2:4] != ["rbd-nbd", "1"] for r in rows):
            return None
        return {r[0]: (r[1], " ".join(r[4:])) for r in rows}

    def writer_daemon():
        """(scope unit, pid) of the rbd-nbd daemon serving the w guest's disk."""
        found = nbd_daemons() or {}
        mine = [(unit, pid) for unit, (pid, argv) in found.items() if " rbd/sd-nbd " in " %s " % argv
                or "/sd-nbd " in argv + " "]
        return mine[0] if len(mine) == 1 else None

    def version():
        return sh("dpkg-query -W -f '${Version}' block-rbd", ok=False)

    def registrations():
        return {n: sorted(v["registrations"]) for n, v in progress(ctx).items()}

    def install_boot():
        t0 = time.time()
        secs = boot()
        names = "block-rbd.socket block-rbd-upkeep.service block-rbd-release-pending.timer"
        state = sh("systemctl is-active %s" % names, ok=False)
        if state.split() != ["active"] * 3:
            raise Failed("%s: %s" % (names, state.replace("\n", " ")))
        if version() != old:
            raise Failed("installed version %r, wanted %s" % (version(), old))
        seen["t_boot"] = t0
        return "agent ready %.1f s after QEMU's start, system running at %.1f s; block-rbd %s from apt; %s active" % (
            secs, time.time() - t0, old, names)

    def xendomains_start():
        secs = connected(seen.pop("t_boot"))
        grew = writes_go_on("after xendomains started them")
        lines = sh("journalctl -b -t block-rbd -o cat --no-pager", ok=False).splitlines()
        adds = [ln for ln in lines if ": add: " in ln and " -> " in ln]
        via = sh("journalctl -b -t block-rbd _SYSTEMD_UNIT=block-rbd.service -o cat --no-pager", ok=False).splitlines()
        started = sh("journalctl -b -u block-rbd.service -o cat --no-pager | grep -c '^Started block-rbd.service'",
                     ok=False)
        twice = sorted({ln for ln in lines if lines.count(ln) > 1})
        if len(adds) != len(GUESTS) or not all(a in via for a in adds):
            raise Failed("journal: %d adds, %d of them from block-rbd.service: %s" % (
                len(adds), sum(a in via for a in adds), adds))
        if twice or not all(ln.startswith("backend/vbd/") for ln in adds):
            raise Failed("journal lines twice or without their backend path: %s" % (twice or adds)[:2])
        return ("four guests connected %.1f s after QEMU's start; the %d adds logged once each by block-rbd.service "
                "(started by its socket %s time(s)), each with its backend path; %s" % (secs, len(adds), started, grew))

    def scope():
        found = d.wait_for("an rbd-nbd daemon in a block-rbd-nbd scope for each nbd disk",
                           lambda: (lambda f: f if f and len(f) == 2 else None)(nbd_daemons()), 30)
        daemon["nbd"] = writer_daemon()
        if not daemon["nbd"]:
            raise Failed("no daemon for rbd/sd-nbd among %s" % found)
        return "; ".join("rbd-nbd %s in %s" % (pid, unit) for unit, (pid, _a) in sorted(found.items()))

    def heal():
        unit, pid = daemon["nbd"]
        watch = Watch(ctx, "heal")
        try:
            sh("kill -9 %s" % pid)
            t0 = time.time()
            found = d.wait_for("a new rbd-nbd daemon (upkeep's heal)",
                               lambda: (lambda f: f if f and f[1] != pid else None)(writer_daemon()), 90)
            healed = time.time() - t0
            grew = writes_go_on("after the heal")
        finally:
            pause = watch.result()["sd-nbd"]["longest_pause"]
        daemon["nbd"] = found
        return "killed rbd-nbd %s; upkeep's new one %s (%s) after %.1f s, the guest's longest pause %.1f s; %s" % (
            pid, found[1], found[0], healed, pause, grew)

    def units_killed():
        upkeep = sh("systemctl show -p MainPID --value block-rbd-upkeep.service")
        sh("systemctl kill -s KILL block-rbd.service block-rbd-upkeep.service", ok=False)
        back = d.wait_for("block-rbd-upkeep.service back", lambda: (lambda p: p if p not in ("0", upkeep) else None)(
            sh("systemctl show -p MainPID --value block-rbd-upkeep.service", ok=False)), 30, 1)
        socket = sh("systemctl is-active block-rbd.socket", ok=False)
        if socket != "active" or writer_daemon() != daemon["nbd"]:
            raise Failed("after the kill: socket %s, rbd-nbd %s (was %s)" % (socket, writer_daemon(), daemon["nbd"]))
        return "upkeep %s killed, systemd started %s; the socket active, rbd-nbd %s kept; %s" % (
            upkeep, back, daemon["nbd"][1], writes_go_on("after the kill"))

    def adopt():
        # where 0.1.0 left its daemons: in the unit that started them
        unit, pid = daemon["nbd"]
        sh("echo %s > /sys/fs/cgroup/system.slice/block-rbd-upkeep.service/cgroup.procs" % pid)
        out = sh("block-rbd adopt-daemons")
        found = writer_daemon()
        if not found or found[1] != pid or found[0] == unit:
            raise Failed("rbd-nbd %s not in a new scope after adopt-daemons (%r): %s" % (pid, found, out))
        sh("systemctl restart block-rbd-upkeep.service")
        sh("kill -0 %s" % pid)
        daemon["nbd"] = found
        return "rbd-nbd %s moved from block-rbd-upkeep.service into %s, alive after upkeep's restart; %s" % (
            pid, found[0], writes_go_on("after the adoption"))

    def upgrade():
        daemons = nbd_daemons()
        regs = registrations()
        upkeep = sh("systemctl show -p MainPID --value block-rbd-upkeep.service")
        watch = Watch(ctx, "upgrade")
        try:
            t0 = time.time()
            sh("%s install %s" % (APT, UPGRADE_DEB), timeout=400)
            secs = time.time() - t0
            grew = writes_go_on("after the upgrade")
        finally:
            pauses = watch.result()
        if version() != new:
            raise Failed("version after the upgrade %r, wanted %s" % (version(), new))
        if nbd_daemons() != daemons:
            raise Failed("the rbd-nbd daemons %s did not all survive the upgrade (now %s)" % (daemons, nbd_daemons()))
        if registrations() != regs:
            raise Failed("registrations changed: %s -> %s" % (regs, registrations()))
        state = sh("systemctl is-active block-rbd.socket block-rbd-upkeep.service", ok=False)
        after = sh("systemctl show -p MainPID --value block-rbd-upkeep.service", ok=False)
        if state.split() != ["active", "active"] or after in ("0", upkeep):
            raise Failed("after the upgrade: socket/upkeep %s, upkeep pid %s -> %s" % (state.split(), upkeep, after))
        return ("%s -> %s in %.0f s (apt-get); upkeep restarted (%s -> %s); both rbd-nbd daemons and every "
                "registration kept; the guests' longest pause %s; %s" % (
                    old, new, secs, upkeep, after, ", ".join(
                        "%s %.1f s" % (n, pauses[n]["longest_pause"]) for n in WRITERS), grew))

    def reboot_restore():
        t0 = time.time()
        down = d.power("reboot", DOWN_TIMEOUT)
        held = {n: v for n, v in progress(ctx).items() if v["watchers"] or v["registrations"]}
        if held:
            raise Failed("dom0 down, yet in Ceph: %s" % held)
        t1 = time.time()
        boot()
        secs = connected(t1)
        saved = sh("journalctl -b -1 -u xendomains -o cat --no-pager | grep -ci 'sav'", ok=False)
        return ("systemctl reboot -> QEMU exit %.1f s, nothing held in Ceph meanwhile; QEMU start -> four guests "
                "restored and connected %.1f s (%s xendomains lines of saving); %s" % (
                    down, secs, saved, writes_go_on("after the restore")))

    def power_cut():
        ctx.power_cut("a")
        stale = {n: len(v["registrations"]) for n, v in progress(ctx).items()}
        if not all(stale.values()):
            raise Failed("after the power cut no registration of some disk is left in Ceph: %s" % stale)
        t0 = time.time()
        boot()
        secs = connected(t0)
        journal = sh("journalctl -b -t block-rbd -o cat --no-pager", ok=False).splitlines()
        released = [ln for ln in journal if "releas" in ln.lower()]
        refused = [ln for ln in journal if "refused" in ln or "break-lock" in ln or "blocklist" in ln]
        if refused:
            raise Failed("after the power cut: %s" % refused[0])
        return ("registrations left by the cut %s; QEMU start -> four guests connected %.1f s; release-pending: "
                "%d lines, e.g. %s; %s" % (stale, secs, len(released), released[0][:100] if released else "(none)",
                                           writes_go_on("after the power cut")))

    def package_remove():
        daemons = nbd_daemons()
        out = sh("%s remove block-rbd 2>&1" % APT, timeout=300)
        if "stay mapped" not in out or not all(n in out for n in GUESTS):
            raise Failed("prerm did not name the four disks: %s" % out[-400:])
        grew = writes_go_on("after apt-get remove")
        purged = sh("%s purge block-rbd 2>&1" % APT, timeout=300)
        kept = sh("ls /var/lib/block-rbd/registered 2>/dev/null | wc -l", ok=False)
        if "/var/lib/block-rbd" not in purged or kept in ("", "0"):
            raise Failed("purge did not keep and name the ledger (%s notes): %s" % (kept, purged[-400:]))
        if nbd_daemons() != daemons or not all_running():
            raise Failed("after remove and purge: daemons %s (were %s), guests %s" % (
                nbd_daemons(), daemons, sorted(running_guests())))
        grew2 = writes_go_on("after apt-get purge")
        sh("cp /var/tmp/block-rbd.yaml %s && %s install %s" % (CONFIG, APT, UPGRADE_DEB), timeout=400)
        state = sh("systemctl is-active block-rbd.socket block-rbd-upkeep.service", ok=False)
        if state.split() != ["active", "active"]:
            raise Failed("after installing it again: %s" % state.split())
        return ("remove named the four disks left mapped; %s; purge kept the ledger (%s notes) and said so; %s; "
                "nothing unmapped; installed again, units active" % (grew, kept, grew2))

    def poweroff():
        down = d.power("poweroff", POWEROFF_WITHIN)
        held = {n: v for n, v in progress(ctx).items() if v["watchers"] or v["registrations"]}
        if held:
            raise Failed("after the poweroff, in Ceph: %s" % held)
        return "systemctl poweroff with the four guests running -> QEMU exit %.1f s; nothing held in Ceph" % down

    try:
        if not step("install-boot", install_boot):
            return d.results
        ok = step("xendomains-start", xendomains_start)
        if ok and step("nbd-scope", scope):
            step("nbd-heal", heal)
            step("units-killed", units_killed)
            step("adopt-daemons", adopt)
            step("upgrade", upgrade)
        if step("reboot-restore", reboot_restore) and step("power-cut", power_cut):
            step("package-remove", package_remove)
        if ctx.running("a"):
            step("poweroff", poweroff)
    finally:
        d.close()
    return d.results


def verify(ctx, parsed):
    now = progress(ctx)
    held = {n: v for n, v in now.items() if v["watchers"] or v["registrations"]}
    ctx.mark(parsed, "nothing-left", not held,
             "no watcher and no registration on the guests' images (%s)" % ", ".join(
                 "%s %d blocks" % (n, now[n]["blocks"]) for n in sorted(now)) if not held
             else "left in Ceph: %s" % held)
