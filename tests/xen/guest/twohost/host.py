"""The two-host gate: two Xen hosts under QEMU (machines a and b, dom0s xen-a and xen-b)
on one bridge with the test cluster.  The host drives every scenario through each dom0's
brbd-agent, freezes a whole machine with SIGSTOP, and checks images through librbd.

Scenarios (each one result; its commands and outputs in <workdir>/twohost/NAME.log):
  cross-host-refusals  VM X holds w on xen-a: VM Y's w and r on xen-b are refused with one
                       line naming xen-a, X, domid/devid, since; r of a read-only image and
                       w! of a shared one are granted on both hosts at once.
  fixed-uuid-twice     one config with a fixed uuid= created on xen-a, then on xen-b: the
                       second is refused (the same VM, not a migration).
  migrate-krbd/-nbd    a guest writes numbered, checksummed blocks while `xl migrate` moves
                       it a -> b -> a: no I/O error, every block on the image, registrations
                       follow the guest, nothing left on the host it left.
  migrate-fail         the receiving xl is killed once its disk is attached: the guest runs
                       on in a, a's registration stays, b's leftover domain is destroyed and
                       leaves nothing.
  frozen-host-fenced   machine a stopped while its guest holds w: b's attach is refused as
                       alive, then as stale (with the break-lock command), then fenced and
                       taken over (stale: fence); a resumed, its guest's writes fail and none
                       reaches the image.
"""

import hashlib
import importlib.util
import json
import os
import re
import signal
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("brbd_gate_host", os.path.join(HERE, "..", "gate", "host.py"))
gate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gate)

MACHINES = ["a", "b"]
# Debian's Xen is built without shadow paging (CONFIG_SHADOW_PAGING unset): a PV guest
# cannot be live-migrated there (log-dirty of a PV guest needs shadow paging), an HVM or
# PVH guest can, with hardware-assisted paging.  QEMU's TCG emulates SVM with nested
# paging, so the migrating guests are PVH guests (no device model needed).
QEMU_CPU = "qemu64,+svm,+npt"
# One vCPU a machine: the two machines then keep the CI machine's two CPUs busy, no more.
QEMU_SMP = 1
HOSTS = {"a": "xen-a", "b": "xen-b"}
ADDRS = {"a": "10.250.250.2", "b": "10.250.250.3"}
MiB = 1 << 20
IMAGES = {"xh-w": [], "xh-ro": [(0, gate.GOLDEN)], "xh-shared": [], "uuid-twice": [],
          "mig-krbd": [], "mig-nbd": [], "mig-fail": [], "frozen": []}
IMAGE_SIZE = 32 * MiB
MIGRATE = "/usr/lib/brbd/brbd-migrate-via"
FENCE_CONFIG = "/etc/xen/block-rbd-fence.yaml"
WATCH_TIMEOUT_CAP = 150  # the OSDs drop a frozen client's watch after osd_client_watch_timeout (30 s)


def dom0_config(ctx, machine, stale):
    c = ctx.config
    return ("# written by tests/xen/guest/twohost/host.py\n"
            "ceph: {conf: /etc/ceph/ceph.conf, id: %s, keyring: %s}\n"
            "pool: %s\nmapper: krbd\nhost: %s\n"
            "krbd: {options: [ms_mode=prefer-crc]}\n"
            "access: {stale: %s}\n"
            "log: {file: /var/log/xen/xen-hotplug.log, syslog: false, verbose: true}\n"
            % (c["BRBD_ID"], c["BRBD_KEYRING"], c["BRBD_POOL"], HOSTS[machine], stale))


def prepare(ctx):
    work = os.path.join(ctx.workdir, "twohost")
    os.makedirs(work, exist_ok=True)
    with open(ctx.boot["kernel"], "rb") as fh:
        ctx.files["/brbd/guest/vmlinuz"] = fh.read()
    ctx.files["/brbd/guest/initrd.gz"] = gate.guest_initrd(ctx)
    gate.fill_images(ctx, work, {name: (IMAGE_SIZE, writes) for name, writes in IMAGES.items()})
    for m in ctx.machines:
        m.files["/etc/xen/block-rbd.yaml"] = dom0_config(ctx, m.name, "refuse").encode()
        m.files[FENCE_CONFIG] = dom0_config(ctx, m.name, "fence").encode()
        m.files["/etc/hostname"] = (HOSTS[m.name] + "\n").encode()


class Failed(Exception):
    pass


class Run:
    """The scenarios' view of the two machines: commands through the agents, logged."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.agents = {m: ctx.agent(m) for m in MACHINES}
        self.dir = os.path.join(ctx.workdir, "twohost")
        os.makedirs(self.dir, exist_ok=True)
        self.log = None
        self.frozen = set()

    def begin(self, name):
        if self.log:
            self.log.close()
        self.log = open(os.path.join(self.dir, name + ".log"), "w")

    def note(self, text):
        self.log.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), text))
        self.log.flush()

    def sh(self, m, script, timeout=120, ok=True):
        r = self.agents[m].sh(script, timeout)
        self.note("%s rc=%s %.1fs $ %s\n%s" % (HOSTS[m], r["rc"], r["secs"], script, r["out"].rstrip()))
        if ok and r["rc"] != 0:
            last = (r["out"].strip().splitlines() or ["(no output)"])[-1]
            raise Failed("%s: `%s` failed (rc=%s): %s" % (HOSTS[m], script.strip().splitlines()[0][:80], r["rc"], last[:200]))
        return r

    # -- guests
    def disk(self, vdev, image, access="rw", extra=""):
        return "format=raw,vdev=%s,access=%s,script=block-rbd,target=%s:%s%s" % (
            vdev, access, self.ctx.pool, image, extra)

    def create(self, m, name, disks, args="brbd_mode=idle", vm=None, paused=True, ok=True, env="",
               memory=96, kind="pv"):
        cfg = ['name = "%s"' % name, 'type = "%s"' % kind, 'kernel = "/brbd/guest/vmlinuz"',
               'ramdisk = "/brbd/guest/initrd.gz"', 'extra = "console=hvc0 quiet %s"' % args,
               "memory = %d" % memory, "maxmem = %d" % memory, "vcpus = 1", 'on_poweroff = "preserve"',
               'on_crash = "preserve"', "disk = [ %s ]" % ", ".join("'%s'" % d for d in disks)]
        if vm:
            cfg.append('uuid = "%s"' % vm)
        if kind == "pvh":
            # TCG's CPU has no invariant TSC, so Xen would trap every rdtsc of an HVM guest
            # (tsc_mode "default"): measured, that halves a PVH guest's speed under TCG
            # (boot 58 -> 28 s on Debian 12, 101 -> 60 s on Debian 13)
            cfg.append('tsc_mode = "native"')
        path = "/brbd/tmp/%s.cfg" % name
        return self.sh(m, "cat > %s <<'CFG'\n%s\nCFG\n%stimeout 240 xl create %s%s 2>&1" % (
            path, "\n".join(cfg), env, "-p " if paused else "", path), timeout=260, ok=ok)

    def domains(self, m):
        out = self.sh(m, "xl list | awk 'NR > 2 {print $1}'")["out"]
        return out.split()

    def destroy(self, m, name):
        self.sh(m, "timeout 120 xl destroy %s" % name, timeout=140)

    def console(self, m, name):
        return self.sh(m, "cat /var/log/xen/console/guest-%s*.log 2>/dev/null; true" % name)["out"]

    def wait_console(self, m, name, pattern, secs):
        r = self.sh(m, "i=0; until cat /var/log/xen/console/guest-%s*.log 2>/dev/null | grep -q '%s'; do "
                       "i=$((i+1)); [ $i -gt %d ] && exit 1; sleep 0.2; done" % (name, pattern, secs * 5),
                    timeout=secs + 30, ok=False)
        if r["rc"] != 0:
            tail = self.console(m, name).strip().splitlines()[-3:]
            raise Failed("%s: no %r on the console of %s within %d s (console ends: %s)"
                         % (HOSTS[m], pattern, name, secs, " | ".join(tail) or "empty"))

    def migrate(self, src, name, dst, ok=True):
        t0 = time.time()
        r = self.sh(src, "timeout 300 xl migrate -s %s %s %s 2>&1" % (MIGRATE, name, ADDRS[dst]), timeout=320, ok=ok)
        r["wall"] = round(time.time() - t0, 1)
        return r

    # -- what is left
    def leftovers(self, m):
        """rbd devices, connected nbd devices, block-rbd records and pending releases of dom0 m."""
        out = self.sh(m, "for d in /sys/bus/rbd/devices/*; do [ -e \"$d\" ] && echo rbd${d##*/}; done; "
                         "for p in /sys/block/nbd*/pid; do [ -e \"$p\" ] && echo ${p%/pid}; done; "
                         "for r in /run/block-rbd/maps/*.json /var/lib/block-rbd/pending/*.json "
                         "/var/lib/block-rbd/registered/*.json; do "
                         "[ -e \"$r\" ] && echo $r; done; true")["out"]
        return out.split()

    def assert_clean(self, m, after):
        left = self.leftovers(m)
        if left:
            raise Failed("%s: left behind after %s: %s" % (HOSTS[m], after, " ".join(left)))

    def inspect(self, images, length=0):
        """{image: [its block-rbd registrations (host:holder), watchers, md5 of its first
        `length` bytes]}, through librbd as the admin (the gate's READ)."""
        p = self.ctx.admin_python(gate.READ, [json.dumps([[i, 0, length] for i in images])], timeout=120)
        if p.returncode != 0:
            raise Failed("librbd inspection failed: %s" % p.stderr.strip()[-300:])
        read = json.loads(p.stdout.strip().splitlines()[-1])
        got = {}
        for image in images:
            md5, _head, watchers, regs = read["%s@0" % image]
            got[image] = [sorted(k[len("block-rbd.access."):] for k in regs), watchers, md5]
        self.note("librbd: %s" % json.dumps(got))
        return got

    def registrations(self, image):
        return self.inspect([image])[image][0]

    def expect_regs(self, image, hosts, when):
        regs = self.registrations(image)
        got = sorted(r.split(":", 1)[0] for r in regs)
        if got != sorted(hosts):
            raise Failed("%s: registrations of %s are %s, wanted hosts %s" % (when, image, regs, sorted(hosts)))
        return regs

    def freeze(self, m):
        self.ctx.signal_machine(m, signal.SIGSTOP)
        self.frozen.add(m)
        self.note("machine %s (%s) frozen (SIGSTOP)" % (m, HOSTS[m]))

    def thaw(self, m):
        self.ctx.signal_machine(m, signal.SIGCONT)
        self.frozen.discard(m)
        self.note("machine %s (%s) resumed (SIGCONT)" % (m, HOSTS[m]))

    def cleanup(self):
        """After a failed scenario: every guest on both hosts goes (their removes run)."""
        for m in list(self.frozen):
            self.thaw(m)
        for m in MACHINES:
            try:
                self.sh(m, "for d in $(xl list | awk 'NR > 2 {print $1}'); do timeout 120 xl destroy $d; done; "
                           "xl list", timeout=400, ok=False)
            except (OSError, RuntimeError, ValueError) as exc:
                self.note("cleanup on %s: %s" % (m, exc))


def _refusal(out, image):
    """The refusal line block-rbd wrote (libxl repeats hotplug-error in its own words)."""
    for line in out.splitlines():
        if "%s: " % image in line and "refused" in line:
            return line[line.index("%s: " % image):].strip()
    return None


def expect_refused(r, image, *parts):
    if r["rc"] == 0:
        raise Failed("xl create succeeded where %s had to be refused" % image)
    line = _refusal(r["out"], image)
    if not line:
        raise Failed("xl create failed without block-rbd's refusal of %s: %s" % (
            image, " | ".join(r["out"].strip().splitlines()[-3:])))
    for part in parts:
        if part not in line:
            raise Failed("the refusal does not say %r: %s" % (part, line))
    return line


# ---------------------------------------------------------------- scenarios
def cross_host_refusals(run):
    ux, uy = str(uuid.uuid4()), str(uuid.uuid4())
    run.create("a", "vm-x", [run.disk("xvda", "xh-w"), run.disk("xvdb", "xh-ro", access="ro"),
                             run.disk("xvdc", "xh-shared", extra=",mode=w!")], vm=ux)
    domid = run.sh("a", "xl domid vm-x")["out"].strip()
    w_line = expect_refused(run.create("b", "vm-y", [run.disk("xvda", "xh-w")], vm=uy, ok=False), "xh-w",
                            "w refused: attached w by VM %s (host xen-a, domid %s, devid 51712" % (ux, domid),
                            "since 20")
    expect_refused(run.create("b", "vm-y", [run.disk("xvda", "xh-w", access="ro")], vm=uy, ok=False), "xh-w",
                   "r refused: attached w by VM %s (host xen-a, domid %s, devid 51712" % (ux, domid))
    if "vm-y" in run.domains("b"):
        raise Failed("xen-b: the refused domain vm-y is still there")
    run.assert_clean("b", "two refused creates")
    run.create("b", "vm-y", [run.disk("xvda", "xh-ro", access="ro"), run.disk("xvdb", "xh-shared", extra=",mode=w!")],
               vm=uy)
    run.expect_regs("xh-ro", ["xen-a", "xen-b"], "r on both hosts")
    run.expect_regs("xh-shared", ["xen-a", "xen-b"], "w! on both hosts")
    run.expect_regs("xh-w", ["xen-a"], "after the refusals")
    run.destroy("b", "vm-y")
    run.destroy("a", "vm-x")
    for m in MACHINES:
        run.assert_clean(m, "xl destroy")
    for image in ("xh-w", "xh-ro", "xh-shared"):
        run.expect_regs(image, [], "after both destroys")
    return "xen-b refused w and r while VM X held w on xen-a (%s); r of a read-only image and w! granted on both" % w_line


def fixed_uuid_twice(run):
    vm = str(uuid.uuid4())
    disks = [run.disk("xvda", "uuid-twice")]
    run.create("a", "vm-fixed", disks, vm=vm)
    line = expect_refused(run.create("b", "vm-fixed", disks, vm=vm, ok=False), "uuid-twice",
                          "w refused: attached w by VM %s (host xen-a" % vm,
                          "the same VM on another host, and this domain is not an incoming live migration")
    run.assert_clean("b", "the refused create")
    run.expect_regs("uuid-twice", ["xen-a"], "after the refusal")
    run.destroy("a", "vm-fixed")
    run.assert_clean("a", "xl destroy")
    run.expect_regs("uuid-twice", [], "after the destroy")
    return "the same fixed-uuid config on xen-b refused: %s" % line


STALL_DISK = re.compile(r"BRBD-STALL-DISK (\S+) (\S+) (\S+) blocks=(\d+) errors=(\d+) maxlat=([\d.]+)")


def _writer_report(text):
    m = STALL_DISK.search(text)
    if not m:
        return None
    return {"verdict": m.group(3), "blocks": int(m.group(4)), "errors": int(m.group(5)),
            "maxlat": float(m.group(6)), "slow": re.findall(r"BRBD-STALL-SLOW \S+ block (\d+) took ([\d.]+) s", text)}


def _check_blocks(run, image, n):
    want = hashlib.md5(b"".join(gate.stall_block(image, i) for i in range(n))).hexdigest()
    got = run.inspect([image], 4096 * n)[image][2]
    if got != want:
        raise Failed("the %d blocks of %s in Ceph differ from what the guest wrote" % (n, image))


def _stop_writer(run, m, name):
    """The guest's writer stops when its memory target changes (guest-init's brbd_stop)."""
    run.sh(m, "xl mem-set %s 150m" % name)
    run.wait_console(m, name, "BRBD-STALL-RESULT", 240)
    text = "\n".join(run.console(x, name) for x in MACHINES)
    report = _writer_report(text)
    if not report:
        raise Failed("the guest's writer did not report")
    return report


def _writer(run, m, name, image, mapper_extra, vm, kind="pv"):
    """A guest writing numbered blocks to IMAGE until its memory target changes."""
    run.create(m, name, [run.disk("xvda", image, extra=mapper_extra)], vm=vm, paused=False, kind=kind,
               memory=160 if kind == "pvh" else 96,
               args="brbd_mode=stall brbd_disks=xvda:%s brbd_stall=9999 brbd_run=1200 brbd_stop=balloon" % image)
    run.wait_console(m, name, "BRBD-STALL-STARTED xvda", 240)


def _where(run, name, m, other):
    if name not in run.domains(m):
        raise Failed("%s is not on %s after the migration" % (name, HOSTS[m]))
    if any(d.startswith(name) for d in run.domains(other)):
        raise Failed("%s is still on %s after the migration" % (name, HOSTS[other]))
    run.assert_clean(other, "the migration away")


def migrate(run, mapper):
    name = image = "mig-" + mapper
    extra = ",mapper=nbd" if mapper == "nbd" else ""
    run.note("guest %s, disk %s through %s" % (name, image, mapper))
    _writer(run, "a", name, image, extra, str(uuid.uuid4()), kind="pvh")
    run.expect_regs(image, ["xen-a"], "before the migration")
    there = run.migrate("a", name, "b")
    _where(run, name, "b", "a")
    run.expect_regs(image, ["xen-b"], "after a -> b")
    back = run.migrate("b", name, "a")
    _where(run, name, "a", "b")
    run.expect_regs(image, ["xen-a"], "after b -> a")
    time.sleep(3)  # writes on the way home too
    report = _stop_writer(run, "a", name)
    run.destroy("a", name)
    for m in MACHINES:
        run.assert_clean(m, "the last destroy")
    run.expect_regs(image, [], "after the destroy")
    if report["verdict"] != "ok" or report["errors"]:
        raise Failed("the guest's writer: %s" % report)
    _check_blocks(run, image, report["blocks"])
    pauses = sorted(float(s) for _b, s in report["slow"])[-2:]
    return ("%s: xl migrate a->b %.1f s, b->a %.1f s; the guest wrote %d blocks, no I/O error, all in Ceph; "
            "longest writes (downtime seen by the guest) %s s; registrations followed the guest, nothing left"
            % (mapper, there["wall"], back["wall"], report["blocks"], "/".join("%.1f" % p for p in pauses) or "<1"))


# On the receiving dom0: once the incoming domain's disk backend exists and block-rbd's
# add for it has logged its start, kill -9 the receiving xl (the agent names its pid):
# the migration fails at the sender while the orphaned add still maps the disk; then
# wait for that add to finish.  Cheap polls: the add takes a second or two under TCG.
KILL_RECEIVER = r"""
before=" $(xenstore-list /local/domain/0/backend/vbd 2>/dev/null | tr '\n' ' ') "
i=0 d=""
while [ -z "$d" ]; do
    for x in $(xenstore-list /local/domain/0/backend/vbd 2>/dev/null); do
        case "$before" in *" $x "*) ;; *) d=$x ;; esac
    done
    i=$((i+1)); [ $i -gt 3000 ] && { echo "no disk backend of the incoming domain within 150 s"; exit 1; }
    [ -n "$d" ] || sleep 0.05
done
i=0
until grep -q "add: start (XENBUS_PATH=backend/vbd/$d/51712)" /var/log/xen/xen-hotplug.log; do
    i=$((i+1)); [ $i -gt 1200 ] && { echo "libxl did not run the add of domain $d's disk within 60 s"; exit 1; }
    sleep 0.05
done
pid=$(cat /run/brbd-migrate-receive.pid 2>/dev/null) && kill -9 $pid \
    && echo "killed the receiving xl (pid $pid) as domain $d's disk add began"
i=0
until [ -n "$(xenstore-read /local/domain/0/backend/vbd/$d/51712/hotplug-status 2>/dev/null)" ]; do
    i=$((i+1)); [ $i -gt 600 ] && { echo "the orphaned add of domain $d did not finish within 60 s"; exit 1; }
    sleep 0.1
done
echo "the orphaned add: hotplug-status $(xenstore-read /local/domain/0/backend/vbd/$d/51712/hotplug-status)"
"""


def migrate_fail(run):
    name = image = "mig-fail"
    _writer(run, "a", name, image, "", str(uuid.uuid4()), kind="pvh")
    sent = {}
    sender = threading.Thread(target=lambda: sent.update(run.migrate("a", name, "b", ok=False)), daemon=True)
    sender.start()
    killed = run.sh("b", KILL_RECEIVER % {"name": name}, timeout=200)
    sender.join(timeout=330)
    if "killed the receiving xl" not in killed["out"]:
        raise Failed("xen-b: no receiving xl to kill: %s" % killed["out"].strip()[-200:])
    if sent.get("rc", 0) == 0:
        raise Failed("xl migrate succeeded although its receiver was killed (%s)" % killed["out"].strip())
    run.note("sender: rc=%s after %s s" % (sent.get("rc"), sent.get("wall")))
    if name not in run.domains("a"):
        raise Failed("the guest is not running on xen-a after the failed migration: %s" % run.domains("a"))
    left = [d for d in run.domains("b") if d.startswith(name)]
    run.note("left on xen-b by the killed receiver: %s" % left)
    # the orphaned add registered xen-b too; xen-a's registration is untouched
    run.expect_regs(image, ["xen-a", "xen-b"] if "hotplug-status connected" in killed["out"] else ["xen-a"],
                    "with the killed receiver's domain left on xen-b")
    for d in left:
        run.destroy("b", d)
    run.assert_clean("b", "destroying what the killed receiver left")
    run.expect_regs(image, ["xen-a"], "after the failed migration")
    time.sleep(3)  # the guest writes on
    report = _stop_writer(run, "a", name)
    run.destroy("a", name)
    run.assert_clean("a", "xl destroy")
    run.expect_regs(image, [], "after the destroy")
    if report["verdict"] != "ok" or report["errors"]:
        raise Failed("the guest's writer: %s" % report)
    _check_blocks(run, image, report["blocks"])
    return ("%s; xl migrate failed after %s s, the guest kept running on "
            "xen-a (%d blocks, no I/O error, all in Ceph), xen-a's registration kept, xen-b left nothing after "
            "destroying %s" % ("; ".join(killed["out"].strip().splitlines()), sent.get("wall"), report["blocks"],
                               " ".join(left) or "nothing"))


def frozen_host_fenced(run):
    name, image = "vm-frozen", "frozen"
    _writer(run, "a", name, image, "", str(uuid.uuid4()))
    vm = run.sh("a", "xenstore-read /local/domain/$(xl domid %s)/vm" % name)["out"].strip().rsplit("/", 1)[-1]
    domid = run.sh("a", "xl domid %s" % name)["out"].strip()
    holder = "xen-a:backend/vbd/%s/51712" % domid
    other = str(uuid.uuid4())
    disks = [run.disk("xvda", image)]
    t0 = time.time()
    run.freeze("a")
    try:
        alive = expect_refused(run.create("b", "vm-other", disks, vm=other, ok=False), image,
                               "w refused: attached w by VM %s (host xen-a, domid %s" % (vm, domid))
        if "stale" in alive:
            raise Failed("refused as stale at once (%.0f s after the freeze): %s" % (time.time() - t0, alive))
        t_alive = time.time() - t0
        while True:
            r = run.sh("b", "/etc/xen/scripts/block-rbd locks %s/%s --format json" % (run.ctx.pool, image))
            regs = json.loads(r["out"][r["out"].index("{"):])["registrations"]
            if any(x["key"] == holder and x["state"] == "stale" for x in regs):
                break
            if time.time() - t0 > WATCH_TIMEOUT_CAP:
                raise Failed("xen-a's registration still not stale %d s after the freeze: %s" % (WATCH_TIMEOUT_CAP, regs))
            time.sleep(3)
        t_stale = time.time() - t0
        stale = expect_refused(run.create("b", "vm-other", disks, vm=other, ok=False), image,
                               "stale attachment", "block-rbd break-lock %s/%s %s" % (run.ctx.pool, image, holder))
        run.create("b", "vm-other", disks, vm=other, env="BLOCK_RBD_CONFIG=%s " % FENCE_CONFIG)
        t_fenced = time.time() - t0
        said = run.sh("b", "grep 'fenced stale access holder %s' /var/log/xen/xen-hotplug.log | tail -n 1" % holder)
        if not said["out"].strip():
            raise Failed("xen-b's log does not say it fenced %s" % holder)
        before = run.inspect([image], IMAGE_SIZE)[image][2]
    finally:
        run.thaw("a")
    run.wait_console("a", name, "BRBD-STALL-DISK", 240)
    text = run.console("a", name)
    errors = [line for line in text.splitlines() if "BRBD-STALL-ERROR" in line]
    if not errors:
        raise Failed("the frozen guest's writes did not fail after the fence: %s" % _writer_report(text))
    time.sleep(5)  # anything still queued in xen-a would land now
    after = run.inspect([image], IMAGE_SIZE)[image][2]
    if after != before:
        raise Failed("the image changed after the fence: a write of the fenced host reached it")
    run.expect_regs(image, ["xen-b"], "after the takeover")
    run.destroy("a", name)
    run.assert_clean("a", "destroying the fenced guest")
    run.destroy("b", "vm-other")
    run.assert_clean("b", "xl destroy")
    run.expect_regs(image, [], "after both destroys")
    return ("xen-a frozen: refused as alive at %.0f s, stale at %.0f s (%s), fenced and taken over at %.0f s; "
            "xen-a resumed: its guest's write failed (%s), the image unchanged"
            % (t_alive, t_stale, stale[stale.index("fence it:"):] if "fence it:" in stale else stale, t_fenced,
               errors[0].split(":", 1)[-1].strip()[:80]))


SCENARIOS = [
    ("cross-host-refusals", cross_host_refusals),
    ("fixed-uuid-twice", fixed_uuid_twice),
    ("migrate-krbd", lambda run: migrate(run, "krbd")),
    ("migrate-nbd", lambda run: migrate(run, "nbd")),
    ("migrate-fail", migrate_fail),
    ("frozen-host-fenced", frozen_host_fenced),
]


def drive(ctx):
    """Run the scenarios once both dom0s' agents answer; the results, one per scenario."""
    only = os.environ.get("BLOCK_RBD_XEN_ONLY", "").split()
    run = Run(ctx)
    results = []
    try:
        run.begin("boot")
        for m in MACHINES:
            t0 = time.time()
            if not run.agents[m].wait_ready(420):
                return [{"name": n, "status": "FAIL", "seconds": 0.0,
                         "detail": "dom0 %s never answered (its serial log says why)" % HOSTS[m]} for n, _f in SCENARIOS]
            run.note("dom0 %s answering after %.0f s more" % (HOSTS[m], time.time() - t0))
        for name, func in SCENARIOS:
            if only and name not in only:
                results.append({"name": name, "status": "SKIP", "seconds": 0.0,
                                "detail": "not selected (BLOCK_RBD_XEN_ONLY=%s)" % " ".join(only)})
                continue
            run.begin(name)
            t0 = time.time()
            try:
                status, detail = "PASS", func(run)
            except Failed as exc:
                status, detail = "FAIL", str(exc)
            except Exception as exc:  # the harness's own trouble: still one result, then go on
                status, detail = "FAIL", "%s: %s" % (type(exc).__name__, exc)
            run.note("%s %s" % (status, detail))
            if status == "FAIL":
                run.cleanup()
            results.append({"name": name, "status": status, "seconds": round(time.time() - t0, 1), "detail": detail})
    finally:
        for agent in run.agents.values():
            agent.finish()
        if run.log:
            run.log.close()
    return results
