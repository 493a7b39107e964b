"""Host side of the release gate (loaded by harness.py): fill images before boot, check
what dom0 and the guests wrote through librbd after the run.

prepare: images with known contents (as the cluster admin, through librbd), the PV
guest's kernel + initramfs, the PyGrub image (an ext4 made with mkfs.ext4 -d, imported
into an RBD image), dom0's /etc/xen/block-rbd.yaml, and the test tree for pytest in dom0.
verify: the patterns written through /dev/xvdb in dom0 and the guests' writes are in Ceph.
"""

import glob
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
XEN_TESTS = os.path.dirname(os.path.dirname(HERE))
REPO = os.path.dirname(os.path.dirname(XEN_TESTS))
sys.path.insert(0, XEN_TESTS)
import build_dom0  # noqa: E402
from cpio import CpioWriter, write_tree  # noqa: E402

MiB = 1 << 20
PATTERN_OFFSET = MiB
PATTERN_LEN = 4 * MiB
PV_IMAGES = ["pv-a", "pv-b", "pv-c", "pv-d"]
PV_MARKER_LEN = 64
# Concurrent adds of the gate's storms (krbd; the nbd storm runs 4): a TCG dom0 is some 30
# times slower than a real one, and slow CI days slow it 3-10 times more (16 adds then
# connected 3 of 16).  32 connect in 26 s on a quiet day (run it by hand: STORM_N = 32);
# benchmarks/boot_storm.py runs 16 to 64 on the host.
STORM_N = 8
# one set per storm (gate/main): a storm that leaves registrations must not spoil the next
STORM_IMAGES = ["storm-%s-%d" % (label, i) for label in ("krbd", "nbd", "krbd-service", "nbd-service")
                for i in range(STORM_N)]
STALL_IMAGES = ["stall-krbd", "stall-nbd"]
STALL_SECS = 20
DAY2_IMAGES = ["day2-krbd", "day2-nbd", "day2-fuse", "day2-fs"]  # resize, discard, online fs growth
HEAL_IMAGES = ["heal-nbd"]               # rbd-nbd killed under a guest's writes
QOS_IMAGES = ["qos-iops", "qos-bps", "qos-none"]
GOLDEN = (b"block-rbd golden read-only data\n" * 32768)[:MiB]

# Images and what they hold before boot: name -> (size, [(offset, data)]).
def images(pattern):
    spec = {
        "krbd1": (64 * MiB, []),
        "nbd1": (64 * MiB, []),
        "secure-krbd": (64 * MiB, []),  # ms_mode=secure: wire encryption
        "secure-nbd": (64 * MiB, []),
        "ro1": (64 * MiB, [(0, GOLDEN)]),
        "bench": (64 * MiB, []),
    }
    for name in PV_IMAGES:
        spec[name] = (16 * MiB, [(0, ("BRBD-MARKER %s\n" % name).encode())])
    for name in STORM_IMAGES + ["monrestart"]:
        spec[name] = (16 * MiB, [])
    for name in STALL_IMAGES + HEAL_IMAGES:
        spec[name] = (32 * MiB, [])
    for name in DAY2_IMAGES:
        spec[name] = (32 * MiB, [])
    for name in QOS_IMAGES:
        spec[name] = (64 * MiB, [])
    return spec


def stall_block(image, n):
    """Block n as the guest's stall writer writes it (guest-init)."""
    return ("BRBD-STALL %s %06d\n" % (image, n)).encode().ljust(4096, b"\0")


def host_action(ctx, action, args):
    """What dom0 asks for during the run (brbd_host in brbd-lib.sh)."""
    if action == "osd-pause":
        # memstore: a restarted OSD would come back empty, so stop it instead of killing it
        secs = float(args[0])
        pid = cluster_pids(ctx)["osd.0"]
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(secs)
        finally:
            os.kill(pid, signal.SIGCONT)
        return "osd.0 (pid %d) stopped for %.0f s, continued%s" % (pid, secs, unlag(ctx))
    if action == "restart-mon":  # [seconds to leave it down]
        t0 = time.time()
        p = ctx.cluster_ctl("restart-mon", "--down", args[0] if args else 0)
        if p.returncode != 0:
            raise RuntimeError("testcluster restart-mon: %s" % p.stderr.strip()[-500:])
        return "mon.a down %s s, answering again after %.1f s (pid %s)" % (
            args[0] if args else 0, time.time() - t0, cluster_pids(ctx)["mon.a"])
    if action == "resize":  # IMAGE BYTES: as another host (or an operator's workstation) would
        p = ctx.admin_python(RESIZE, args, timeout=60)
        if p.returncode != 0:
            raise RuntimeError("resize: %s" % p.stderr.strip()[-300:])
        return p.stdout.strip().splitlines()[-1]
    if action == "allocated":  # IMAGE...: bytes allocated in Ceph, by librbd's diff
        p = ctx.admin_python(ALLOCATED, [json.dumps(args)], timeout=60)
        if p.returncode != 0:
            raise RuntimeError("allocated: %s" % p.stderr.strip()[-300:])
        return p.stdout.strip().splitlines()[-1]
    raise ValueError("unknown host action %r" % action)


RESIZE = r"""
import sys, rados, rbd
conf, keyring, pool, name, size = sys.argv[1:6]
c = rados.Rados(conffile=conf, rados_id="admin", conf={"keyring": keyring})
c.connect(timeout=30)
with rbd.Image(c.open_ioctx(pool), name) as im:
    old = im.size()
    im.resize(int(size))
    print("%s %d -> %d bytes" % (name, old, im.size()))
"""

# Bytes of each image that exist in Ceph (diff from the beginning of time), "name=bytes ...".
ALLOCATED = r"""
import json, sys, rados, rbd
conf, keyring, pool, names = sys.argv[1:5]
c = rados.Rados(conffile=conf, rados_id="admin", conf={"keyring": keyring})
c.connect(timeout=30)
io = c.open_ioctx(pool)
out = []
for name in json.loads(names):
    with rbd.Image(io, name, read_only=True) as im:
        total = [0]
        def count(offset, length, exists):
            if exists:
                total[0] += length
        im.diff_iterate(0, im.size(), None, count, whole_object=False)
        out.append("%s=%d" % (name, total[0]))
print(" ".join(out))
"""


# Runs inside the namespace as the admin: one object per PG of the pool is read (written
# first if need be), each op bounded; prints the PGs that did not answer, as JSON.
PROBE = r"""
import json, sys, rados
conf, keyring, pool, secs = sys.argv[1:5]
c = rados.Rados(conffile=conf, rados_id="admin",
                conf={"keyring": keyring, "rados_osd_op_timeout": secs, "rados_mon_op_timeout": secs})
c.connect(timeout=int(float(secs)))
io = c.open_ioctx(pool)

def mon(**cmd):
    ret, out, err = c.mon_command(json.dumps(dict(cmd, format="json")), b"")
    if ret:
        raise SystemExit("%s: %s" % (cmd["prefix"], err))
    return json.loads(out)

pg_num = mon(prefix="osd pool get", pool=pool, var="pg_num")["pg_num"]
objects = {}  # pgid -> an object name in it
i = 0
while len(objects) < pg_num and i < 100 * pg_num:
    name = "brbd-probe-%d" % i
    objects.setdefault(mon(prefix="osd map", pool=pool, object=name)["pgid"], name)
    i += 1
silent = []
for pgid, name in sorted(objects.items()):
    try:
        io.write_full(name, b"probe")
        io.read(name)
        io.remove_object(name)
    except rados.Error as exc:
        silent.append([pgid, type(exc).__name__])
print(json.dumps(silent))
"""


def silent_pgs(ctx, secs=10):
    """[pgid, error] of the pool's PGs that do not serve a write and a read within secs."""
    p = ctx.admin_python(PROBE, [str(secs)], timeout=secs * 40 + 60)
    if p.returncode != 0:
        raise RuntimeError("PG probe: %s" % p.stderr.strip()[-300:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def unlag(ctx, limit=90):
    """After the stop, every PG of the pool must serve I/O again, so that what comes next
    tests block-rbd, not a wedged test cluster.  A PG whose read lease ran out during the
    stop stays laggy in this size-1 pool (no peer renews the lease; tools/testcluster.py
    makes the lease longer than the stop for that reason).  Should one still go silent,
    the OSD is marked down: it comes back up at once in a new interval, its PGs peer
    again and serve (`ceph pg repeer` did not help: seen).  Probed by I/O, not by
    `ceph pg ls`, whose states lag."""
    started = time.time()
    done = []
    while True:
        silent = silent_pgs(ctx)
        if not silent:
            return "; every PG answered %.1f s after%s" % (
                time.time() - started, " (%s)" % ", ".join(done) if done else "")
        waited = time.time() - started
        if waited > limit:
            raise RuntimeError("PGs %s still not serving I/O %.0f s after the OSD continued (%s)"
                               % (silent, waited, ", ".join(done) or "nothing done"))
        if not done:
            ctx.admin(["ceph", "osd", "down", "0"], timeout=30)
            done.append("marked osd.0 down for silent PGs %s" % " ".join(p for p, _e in silent))
        time.sleep(2)


def cluster_pids(ctx):
    p = ctx.cluster_ctl("status", timeout=60)
    return json.loads(p.stdout)["pids"]


# Runs inside the namespace as the admin: argv = conf, keyring, pool, job.json
FILL = r"""
import json, sys, rados, rbd
conf, keyring, pool, job = sys.argv[1:5]
c = rados.Rados(conffile=conf, rados_id="admin", conf={"keyring": keyring})
c.connect(timeout=30)
io = c.open_ioctx(pool)
for item in json.load(open(job)):
    try:
        rbd.RBD().remove(io, item["name"])
    except rbd.ImageNotFound:
        pass
    rbd.RBD().create(io, item["name"], item["size"], old_format=False)
    with rbd.Image(io, item["name"]) as im:
        for off, path in item["writes"]:
            im.write(open(path, "rb").read(), off)
print("ok")
"""

READ = r"""
import hashlib, json, sys, rados, rbd
conf, keyring, pool, job = sys.argv[1:5]
c = rados.Rados(conffile=conf, rados_id="admin", conf={"keyring": keyring})
c.connect(timeout=30)
io = c.open_ioctx(pool)
out = {}
for name, off, length in json.loads(job):
    try:
        with rbd.Image(io, name, read_only=True) as im:
            data = im.read(off, length)
            watchers = len(list(im.watchers_list())) if hasattr(im, "watchers_list") else -1
            with rados.ReadOpCtx() as op:  # block-rbd's cluster-wide registrations
                items, _ret = io.get_omap_vals(op, "", "block-rbd.access.", 1000)
                io.operate_read_op(op, "rbd_header." + im.id())
                regs = [k for k, _v in items]
        out["%s@%d" % (name, off)] = [hashlib.md5(data).hexdigest(), data[:64].hex(), watchers, regs]
    except rbd.ImageNotFound:
        out["%s@%d" % (name, off)] = None
print(json.dumps(out))
"""


def _workdir(ctx):
    path = os.path.join(ctx.workdir, "gate")
    os.makedirs(path, exist_ok=True)
    return path


def _extract_root(ctx, name):
    if ctx.boot.get("sysroot"):  # a stack built from one Debian root holds every package
        return ctx.boot["sysroot"]
    versions = ctx.boot["packages"]
    pkg = [n for n in versions if n == name or (name == "kernel" and n.startswith("linux-image-"))][0]
    roots = build_dom0.fetch_and_extract(build_dom0.cache_dir(), {pkg: versions[pkg]})
    return roots[pkg]


# What the guest carries besides busybox: xen-blkfront, ext4 (day2-guest grows a
# filesystem online) and e2fsprogs from this host (the same Debian release as the kernel).
GUEST_MODULES = ["xen-blkfront", "ext4", "crc32c_generic"]
GUEST_BINS = ["/usr/sbin/mke2fs", "/usr/sbin/resize2fs", "/usr/sbin/e2fsck"]


def guest_initrd(ctx, busybox_root=None, kernel_root=None):
    """busybox-static, the guest's modules, e2fsprogs and guest-init, gzip'd newc cpio
    (busybox and the modules from the given roots, by default the boot set's)."""
    bb = os.path.join(busybox_root or _extract_root(ctx, "busybox-static"), "bin/busybox")
    kroot = kernel_root or _extract_root(ctx, "kernel")
    (modroot,) = glob.glob(os.path.join(kroot, "lib/modules/*"))
    kver = os.path.basename(modroot)
    stage = os.path.join(_workdir(ctx), "guest-root")
    shutil.rmtree(stage, ignore_errors=True)
    for d in ("usr/bin", "usr/sbin", "usr/lib64", "usr/lib/x86_64-linux-gnu", "proc", "sys", "dev", "tmp",
              "mnt", "etc"):
        os.makedirs(os.path.join(stage, d))
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        os.symlink(target, os.path.join(stage, link))
    os.symlink("/proc/mounts", os.path.join(stage, "etc/mtab"))  # resize2fs looks there
    st = build_dom0.Stage(stage, [])
    st.put_file(bb, "/usr/bin/busybox", 0o755)
    build_dom0.put_modules(stage, modroot, kver, GUEST_MODULES)
    for b in GUEST_BINS:
        st.with_libs(b)
    with open(os.path.join(HERE, "guest-init"), "rb") as fh:
        st.write("/init", fh.read().decode(), 0o755)
    buf = io.BytesIO()
    w = CpioWriter(buf)
    write_tree(w, stage)
    w.chardev("/dev/console", 5, 1)
    w.close()
    shutil.rmtree(stage)
    return gzip.compress(buf.getvalue(), compresslevel=6, mtime=0)


def elf_kernel(bzimage):
    """The kernel's ELF image (vmlinux), gzip'd, out of a bzImage.

    GRUB for Xen loads only ELF or bzImages whose payload it can decompress, and GRUB 2.12
    cannot decompress Debian 13's zstd payload ("not xen image"); a gzip'd ELF it reads
    through its own gunzip, and so does libxl for pygrub.  The payload's place is in the
    bzImage's setup header (boot protocol 2.08+): setup_sects, payload_offset/_length.
    """
    import lzma
    import struct
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    # the kernel's build appends the uncompressed size (4 bytes) to the compressed stream
    payload = bzimage[(setup_sects + 1) * 512 + offset:][:length][:-4]
    if payload.startswith(b"\xfd7zXZ\x00"):
        elf = lzma.decompress(payload)
    elif payload.startswith(b"\x28\xb5\x2f\xfd"):
        elf = subprocess.run(["zstd", "-dc"], input=payload, stdout=subprocess.PIPE, check=True,
                             timeout=120).stdout
    elif payload.startswith(b"\x1f\x8b"):
        elf = gzip.decompress(payload)
    else:
        raise RuntimeError("the guest kernel's payload is compressed in a way the gate does not know")
    if not elf.startswith(b"\x7fELF"):
        raise RuntimeError("the guest kernel's payload is not an ELF image")
    return gzip.compress(elf, compresslevel=6, mtime=0)


def pygrub_fs(ctx, kernel, initrd, path):
    """An ext4 filesystem (no partition table) with /boot/grub/grub.cfg, kernel, initrd:
    pygrub (in dom0) and PV-Grub (in the guest) boot from it alike."""
    stage = path + ".d"
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(os.path.join(stage, "boot", "grub"))
    with open(os.path.join(stage, "boot", "vmlinux-brbd.gz"), "wb") as fh:
        fh.write(kernel)
    with open(os.path.join(stage, "boot", "initrd-brbd.gz"), "wb") as fh:
        fh.write(initrd)
    with open(os.path.join(stage, "boot", "grub", "grub.cfg"), "w") as fh:
        fh.write("set default=0\nset timeout=0\n\n"
                 "menuentry 'block-rbd pygrub test' {\n"
                 "\tlinux /boot/vmlinux-brbd.gz console=hvc0 quiet brbd_mode=pygrub brbd_token=from-rbd-image\n"
                 "\tinitrd /boot/initrd-brbd.gz\n}\n")
    size_mb = (len(kernel) + len(initrd)) // MiB + 8
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "brbdboot", "-E",
                    "root_owner=0:0", "-d", stage, path, "%dM" % size_mb],
                   check=True, timeout=60, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shutil.rmtree(stage)
    return size_mb


def dom0_config(ctx, host="dom0-under-test", syslog=False):
    """dom0's block-rbd.yaml (host None: block-rbd's default, the hostname; a systemd dom0
    logs to the journal through syslog, and not verbosely)."""
    c = ctx.config
    return ("# written by tests/xen/guest/gate/host.py\n"
            "ceph: {conf: /etc/ceph/ceph.conf, id: %s, keyring: %s}\n"
            "pool: %s\nmapper: krbd\n%s"
            "krbd: {options: [ms_mode=prefer-crc]}\n"
            "log: {file: /var/log/xen/xen-hotplug.log, syslog: %s, verbose: %s}\n"
            % (c["BRBD_ID"], c["BRBD_KEYRING"], c["BRBD_POOL"], "host: %s\n" % host if host else "",
               "true" if syslog else "false", "false" if syslog else "true"))


def test_tree(files):
    """The test suite, tools/testcluster.py and benchmarks/attach.py under /opt/block-rbd."""
    for top in ("tests", "tools", "benchmarks"):
        for dirpath, dirnames, filenames in os.walk(os.path.join(REPO, top)):
            dirnames[:] = sorted(d for d in dirnames if d not in ("__pycache__", "xen", ".pytest_cache"))
            for name in sorted(filenames):
                if name.endswith((".pyc", ".pyo")):
                    continue
                src = os.path.join(dirpath, name)
                rel = os.path.relpath(src, REPO)
                if top == "tests" and not (name.endswith(".py") or rel.count(os.sep) == 1):
                    continue
                with open(src, "rb") as fh:
                    files["/opt/block-rbd/" + rel] = (fh.read(), os.stat(src).st_mode & 0o777)
    for name in ("setup.cfg", "pytest.ini", "pyproject.toml", "tox.ini"):
        src = os.path.join(REPO, name)
        if os.path.exists(src):
            with open(src, "rb") as fh:
                files["/opt/block-rbd/" + name] = fh.read()


def fill_images(ctx, work, spec, extra=()):
    """Create every image of spec {name: (size, [(offset, bytes)])} afresh, with those
    writes, as the admin through librbd; `extra`: more job items (writes from files)."""
    job = []
    for name, (size, writes) in sorted(spec.items()):
        item = {"name": name, "size": size, "writes": []}
        for n, (off, data) in enumerate(writes):
            path = os.path.join(work, "%s.%d.bin" % (name, n))
            with open(path, "wb") as fh:
                fh.write(data)
            item["writes"].append([off, path])
        job.append(item)
    job += list(extra)
    with open(os.path.join(work, "fill.json"), "w") as fh:
        json.dump(job, fh)
    p = ctx.admin_python(FILL, [os.path.join(work, "fill.json")], timeout=180)
    if p.returncode != 0 or "ok" not in p.stdout:
        raise RuntimeError("filling the images failed: %s" % p.stderr[-2000:])


def prepare(ctx):
    work = _workdir(ctx)
    pattern = hashlib.sha256(b"block-rbd gate").digest() * (PATTERN_LEN // 32)
    pattern = bytes(b ^ (i * 131 & 0xFF) for i, b in enumerate(pattern[:PATTERN_LEN]))
    ctx.files["/brbd/run/pattern.bin"] = pattern

    with open(ctx.boot["kernel"], "rb") as fh:
        kernel = fh.read()
    initrd = guest_initrd(ctx)
    ctx.files["/brbd/guest/vmlinuz"] = kernel
    ctx.files["/brbd/guest/initrd.gz"] = initrd

    fs = os.path.join(work, "pygrub.ext4")
    size_mb = pygrub_fs(ctx, elf_kernel(kernel), initrd, fs)
    fill_images(ctx, work, images(pattern), [{"name": "pygrub", "size": size_mb * MiB, "writes": [[0, fs]]}])

    ctx.files["/etc/xen/block-rbd.yaml"] = dom0_config(ctx).encode()
    ctx.config["BRBD_PATTERN_MD5"] = hashlib.md5(pattern).hexdigest()
    ctx.config["BRBD_GOLDEN_MD5"] = hashlib.md5(GOLDEN).hexdigest()
    ctx.config["BRBD_PV_IMAGES"] = " ".join(PV_IMAGES)
    ctx.config["BRBD_STORM_N"] = STORM_N
    ctx.config["BRBD_STALL_SECS"] = STALL_SECS
    ctx.config["BRBD_HEAL_IMAGES"] = " ".join(HEAL_IMAGES)
    test_tree(ctx.files)


def stall_blocks(ctx):
    """{image: blocks the guest wrote} from the reports of osd-stall-guest and nbd-heal-guest."""
    found = {}
    for name in ("stall.txt", "heal.txt"):
        path = os.path.join(ctx.workdir, "out", name)
        if os.path.exists(path):
            with open(path, errors="replace") as fh:
                found.update({m.group(1): int(m.group(2)) for m in
                              re.finditer(r"BRBD-STALL-DISK \S+ (\S+) \S+ blocks=(\d+)", fh.read())})
    return found


def verify(ctx, parsed):
    pattern_md5 = ctx.config["BRBD_PATTERN_MD5"]
    stall = stall_blocks(ctx)
    want = [["krbd1", PATTERN_OFFSET, PATTERN_LEN], ["nbd1", PATTERN_OFFSET, PATTERN_LEN],
            ["secure-krbd", PATTERN_OFFSET, PATTERN_LEN], ["secure-nbd", PATTERN_OFFSET, PATTERN_LEN],
            ["ro1", 0, MiB]] + [[n, 4096, 64] for n in PV_IMAGES]
    want += [[n, 0, 4096 * max(1, stall.get(n, 0))] for n in STALL_IMAGES + HEAL_IMAGES]
    want += [[n, 0, 4096] for n in STORM_IMAGES + ["monrestart"]]
    p = ctx.admin_python(READ, [json.dumps(want)], timeout=120)
    if p.returncode != 0:
        raise RuntimeError("reading back through librbd failed: %s" % p.stderr[-2000:])
    got = json.loads(p.stdout.strip().splitlines()[-1])
    with open(os.path.join(_workdir(ctx), "readback.json"), "w") as fh:
        json.dump(got, fh, indent=1)
    for scenario, key in (("krbd-attach", "krbd1@%d" % PATTERN_OFFSET),
                          ("nbd-attach", "nbd1@%d" % PATTERN_OFFSET),
                          ("secure-krbd", "secure-krbd@%d" % PATTERN_OFFSET),
                          ("secure-nbd", "secure-nbd@%d" % PATTERN_OFFSET)):
        md5 = got[key][0] if got.get(key) else None
        ctx.mark(parsed, scenario, md5 == pattern_md5,
                 "librbd read-back of the pattern %s" % ("matches" if md5 == pattern_md5 else
                                                          "MISMATCH (%s)" % md5))
    md5 = got["ro1@0"][0] if got.get("ro1@0") else None
    golden = hashlib.md5(GOLDEN).hexdigest()
    ctx.mark(parsed, "ro-attach", md5 == golden,
             "image unchanged after the ro attach" if md5 == golden else "image CHANGED (%s)" % md5)
    bad = []
    for name in PV_IMAGES:
        entry = got.get("%s@4096" % name)
        text = bytes.fromhex(entry[1]).split(b"\n")[0].decode("ascii", "replace") if entry else None
        if text != "BRBD-GUEST-WROTE %s" % name:
            bad.append("%s: %r" % (name, text))
    ctx.mark(parsed, "pv-guest-4disks", not bad,
             "the guest's 4 writes are in Ceph" if not bad else "missing guest writes: " + ", ".join(bad))
    bad = []
    for name in STALL_IMAGES:
        entry = got.get("%s@0" % name)
        n = stall.get(name)
        expect = hashlib.md5(b"".join(stall_block(name, i) for i in range(n or 0))).hexdigest()
        if not n:
            bad.append("%s: the guest reported no blocks" % name)
        elif not entry or entry[0] != expect:
            bad.append("%s: the %d blocks in Ceph differ from what the guest wrote" % (name, n))
    pauses = [a for a in ctx.actions if a["request"].startswith("osd-pause")]
    paused = pauses and pauses[0].get("reply", "").startswith("ok")
    if not paused:
        bad.append("the host did not pause the OSD (%s)" % (pauses[0].get("reply") if pauses else "not asked"))
    if any(r["name"] == "osd-stall-guest" and r["status"] != "SKIP" for r in parsed["results"]):
        ctx.mark(parsed, "osd-stall-guest", not bad,
                 "%s; the guest's blocks are in Ceph (%s)" % (pauses[0]["reply"][3:], ", ".join(
                     "%s %d" % kv for kv in sorted(stall.items()))) if not bad else "; ".join(bad))
    if any(r["name"] == "nbd-heal-guest" and r["status"] != "SKIP" for r in parsed["results"]):
        bad = []
        for name in HEAL_IMAGES:
            entry, n = got.get("%s@0" % name), stall.get(name)
            expect = hashlib.md5(b"".join(stall_block(name, i) for i in range(n or 0))).hexdigest()
            if not n or not entry or entry[0] != expect:
                bad.append("%s: %s" % (name, "no blocks reported" if not n else
                                       "the %d blocks in Ceph differ from what the guest wrote" % n))
        ctx.mark(parsed, "nbd-heal-guest", not bad,
                 "every block the guest wrote is in Ceph (%s)" % ", ".join(
                     "%s %d" % (n, stall.get(n, 0)) for n in HEAL_IMAGES) if not bad else "; ".join(bad))
    busy = sorted(k for k, v in got.items() if v and v[2] > 0)
    regs = sorted("%s: %s" % (k, " ".join(v[3])) for k, v in got.items() if v and v[3])
    ctx.mark(parsed, "nothing-left-mapped", not busy and not regs,
             "no watcher and no block-rbd registration left on the gate's images"
             if not busy and not regs else "watchers on: %s; registrations: %s" % (busy, regs))
