#!/usr/bin/python3
"""A real Debian (systemd) Xen dom0 for the gate, as a disk image booted by QEMU.

build(stack) takes tools/debianroot.py's `bookworm-sysdom0` / `trixie-sysdom0` root,
configures a copy of it as a Xen host (fstab, hostname, ifupdown eth0 10.250.250.2/24,
persistent journal, virtio in the initramfs, the test agent as a systemd unit) and turns
it into a raw ext4 image (`mke2fs -d`), cached under BLOCK_RBD_XEN_CACHE
(/var/cache/block-rbd-xen/sysdom0-<stack>-<hash>).  Nothing of block-rbd is in it.

prepare_disk(info, path, files, debs) makes a run's writable copy, with files put in and
.debs installed by apt inside it; read_journal(path) reads its journal after a boot.

The per-run disk is a sparse raw copy, not a qcow2 overlay: files and packages go in
through a loop mount, and this host's kernel has loop but no nbd (qemu-nbd would be the
only way into a qcow2).  A sparse copy costs the image's used blocks once per run.

CLI:
  python3 tests/xen/sysdom0.py build --stack debian12 [--force]   # prints the info JSON
  python3 tests/xen/sysdom0.py journal DISK [-t IDENT] --stack S  # a run's journal

Stdlib only; runs as root (loop devices, mounts, chroot).
"""

import argparse
import contextlib
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(REPO, "tools"))
import debianroot  # noqa: E402

DEFAULT_CACHE = "/var/cache/block-rbd-xen"
# Raised when what build() does to the root changes in a way its inputs do not show.
IMAGE_FORMAT = 1
SUITES = {"debian12": ("bookworm-sysdom0", "4.17"), "debian13": ("trixie-sysdom0", "4.20")}
STACKS = tuple(SUITES)
AGENT = os.path.join(HERE, "dom0", "brbd-agent")
HOSTNAME = "xen-sysdom0"
ADDR = "10.250.250.2"
PREFIX = 24
# room for the .deb, the journal and a guest's files beside the root (sparse: costs nothing)
IMAGE_SLACK = 2 << 30
CMD_TIMEOUT = 900
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
       "LC_ALL": "C.UTF-8"}

FSTAB = "/dev/vda / ext4 errors=remount-ro 0 1\n"
JOURNALD = "[Journal]\nStorage=persistent\n"


def interfaces(addr=ADDR, prefix=PREFIX):
    """/etc/network/interfaces of a dom0 (ifupdown, Debian's default; net.ifnames=0)."""
    return ("# written by tests/xen/sysdom0.py\n"
            "auto lo\niface lo inet loopback\n\n"
            "auto eth0\niface eth0 inet static\n    address %s/%d\n" % (addr, prefix))


def agent_unit(addr=ADDR):
    """The agent as a systemd service.  Its "finish" only ends the process (Restart brings
    it back): powering the machine off is the host's business (systemctl poweroff)."""
    return ("# written by tests/xen/sysdom0.py: test equipment, not product\n"
            "[Unit]\nDescription=block-rbd test agent (the host drives dom0 through it)\n"
            "Wants=network-online.target\nAfter=network-online.target\n"
            # until eth0 has its address the bind fails: retry for as long as it takes
            "StartLimitIntervalSec=0\n\n"
            "[Service]\nEnvironment=BRBD_IP=%s\n"
            "ExecStart=/usr/bin/python3 /usr/lib/brbd/brbd-agent %s 31536000\n"
            "Restart=always\nRestartSec=1\nSyslogIdentifier=brbd-agent\n"
            # the agent's "listening on" line is the console's sign that dom0 is ready
            "StandardOutput=journal+console\nStandardError=journal+console\n\n"
            "[Install]\nWantedBy=multi-user.target\n" % (addr, addr))


def agent_dropin(addr):
    """A drop-in giving a machine other than the first its own address."""
    return ("[Service]\nEnvironment=BRBD_IP=%s\nExecStart=\n"
            "ExecStart=/usr/bin/python3 /usr/lib/brbd/brbd-agent %s 31536000\n" % (addr, addr))


def machine_id(name):
    """A fixed machine id per machine name: a real one at first boot would make systemd
    treat every boot of a fresh copy as a first boot (systemd-firstboot prompts)."""
    return hashlib.md5(("brbd-sysdom0 " + name).encode()).hexdigest() + "\n"


def log(msg):
    print("[sysdom0 %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def run(argv, timeout=CMD_TIMEOUT, **kw):
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=timeout, **kw)
    if p.returncode:
        tail = p.stdout.decode(errors="replace").strip().splitlines()[-20:]
        raise RuntimeError("%s failed (exit %d):\n%s" % (" ".join(argv[:6]), p.returncode, "\n".join(tail)))
    return p.stdout.decode(errors="replace")


def cache_dir():
    return os.environ.get("BLOCK_RBD_XEN_CACHE") or DEFAULT_CACHE


def added_files(suite):
    """{path in the image: (bytes, mode)} that build() puts into the root."""
    with open(AGENT, "rb") as fh:
        agent = fh.read()
    return {
        "/etc/fstab": (FSTAB.encode(), 0o644),
        "/etc/hostname": (HOSTNAME.encode() + b"\n", 0o644),
        "/etc/hosts": (("127.0.0.1 localhost\n127.0.1.1 %s\n" % HOSTNAME).encode(), 0o644),
        "/etc/machine-id": (machine_id("").encode(), 0o444),
        "/etc/network/interfaces": (interfaces().encode(), 0o644),
        "/etc/systemd/journald.conf.d/brbd.conf": (JOURNALD.encode(), 0o644),
        "/etc/initramfs-tools/modules": (b"# written by tests/xen/sysdom0.py: the root disk\n"
                                         b"virtio_pci\nvirtio_blk\next4\n", 0o644),
        "/etc/resolv.conf": (b"", 0o644),  # no DNS on the test bridge
        "/usr/lib/brbd/brbd-agent": (agent, 0o755),
        "/etc/systemd/system/brbd-agent.service": (agent_unit().encode(), 0o644),
        "/etc/systemd/system/multi-user.target.wants/brbd-agent.service":
            ("->", "/etc/systemd/system/brbd-agent.service"),
    }


def image_key(stack, root):
    suite = SUITES[stack][0]
    h = hashlib.sha256()
    h.update(("%d\0%s\0%s\0%s\0" % (IMAGE_FORMAT, stack, root, " ".join(debianroot.root_packages(suite))))
             .encode())
    for dest, (data, mode) in sorted(added_files(suite).items()):
        h.update(dest.encode() + b"\0" + (data if isinstance(data, bytes) else (data + mode).encode())
                 + b"\0" + str(mode).encode() + b"\0")
    return h.hexdigest()[:12]


def put_files(top, files):
    """Write {abs path: bytes | (bytes, mode) | ("->", link target)} under `top`."""
    for dest, data in sorted(files.items()):
        mode = 0o644
        if isinstance(data, tuple):
            data, mode = data
        full = top + dest
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if os.path.lexists(full):
            os.unlink(full)
        if data == "->":
            os.symlink(mode, full)
            continue
        with open(full, "wb") as fh:
            fh.write(data)
        os.chmod(full, mode)


def root_versions(root):
    out = run(["chroot", root, "dpkg-query", "-W", "-f", "${Package} ${Version}\n"])
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def build(stack="debian12", force=False):
    """The stack's dom0 image, built once: {"stack", "xen", "kernel", "initrd", "image",
    "root", "versions"}."""
    if stack not in SUITES:
        raise ValueError("unknown stack %r (known: %s)" % (stack, ", ".join(STACKS)))
    root = debianroot.build(SUITES[stack][0])
    out = os.path.join(cache_dir(), "sysdom0-%s-%s" % (stack, image_key(stack, root)))
    done = os.path.join(out, "info.json")
    if not force and os.path.exists(done):
        with open(done) as fh:
            return json.load(fh)
    with debianroot.locked(os.path.join(cache_dir(), "sysdom0-%s.lock" % stack)):
        if not force and os.path.exists(done):
            with open(done) as fh:
                return json.load(fh)  # built by another run while this one waited
        return _build(stack, root, out)


def _build(stack, root, out):
    t0 = time.monotonic()
    suite, xenver = SUITES[stack]
    tmp = out + ".tmp"
    stage = tmp + "/stage"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        log("copying %s" % root)
        run(["cp", "-a", "--reflink=auto", root, stage])
        os.unlink(os.path.join(stage, ".complete"))
        put_files(stage, added_files(suite))
        os.makedirs(stage + "/var/log/journal", exist_ok=True)
        os.makedirs(stage + "/brbd/run", exist_ok=True)
        log("update-initramfs (virtio_pci virtio_blk ext4)")
        run(debianroot.in_root(stage, ["update-initramfs", "-u", "-k", "all"]), env=ENV)
        # debianroot leaves its policy-rc.d in the root; a booted dom0 must not have one,
        # and in_root copied the host's resolv.conf in
        for p in ("/usr/sbin/policy-rc.d",):
            if os.path.lexists(stage + p):
                os.unlink(stage + p)
        put_files(stage, {"/etc/resolv.conf": (b"", 0o644)})
        kernels = sorted(glob.glob(stage + "/boot/vmlinuz-*"))
        if len(kernels) != 1:
            raise RuntimeError("expected one kernel in %s/boot, found %s" % (stage, kernels))
        kver = os.path.basename(kernels[0])[len("vmlinuz-"):]
        shutil.copyfile(kernels[0], tmp + "/vmlinuz")
        shutil.copyfile(stage + "/boot/initrd.img-" + kver, tmp + "/initrd.img")
        with gzip.open(stage + "/boot/xen-%s-amd64.gz" % xenver) as src, open(tmp + "/xen.elf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        pk = root_versions(stage)
        used = int(run(["du", "-sx", "--block-size=1", stage]).split()[0])
        size = (used * 5 // 4 + IMAGE_SLACK) // (1 << 20)
        log("mke2fs -d (%d MiB used, image %d MiB)" % (used >> 20, size))
        run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "sysdom0", "-d", stage,
             tmp + "/image.raw", "%dM" % size])
        shutil.rmtree(stage)
        info = {"stack": stack, "xen": out + "/xen.elf", "kernel": out + "/vmlinuz",
                "initrd": out + "/initrd.img", "image": out + "/image.raw", "root": root,
                "kver": kver,
                "versions": {"xen": pk.get("xen-hypervisor-%s-amd64" % xenver),
                             "kernel": pk.get("linux-image-" + kver), "ceph": pk.get("ceph-common"),
                             "systemd": pk.get("systemd"), "python": pk.get("python3")},
                "image_mb": size, "used_mb": used >> 20,
                "build_seconds": round(time.monotonic() - t0, 1)}
        with open(tmp + "/info.json", "w") as fh:
            json.dump(info, fh, indent=1)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # images of this stack built from other inputs are not used any more
    for old in os.listdir(cache_dir()):
        if re.fullmatch(r"sysdom0-%s-[0-9a-f]{12}" % stack, old) and old != os.path.basename(out):
            shutil.rmtree(os.path.join(cache_dir(), old), ignore_errors=True)
    log("built %s in %.0f s" % (out, info["build_seconds"]))
    return info


@contextlib.contextmanager
def mounted(path, readonly=False):
    """The ext4 image `path` loop-mounted on a fresh directory; unmounted and detached on
    every way out."""
    mnt = tempfile.mkdtemp(prefix="brbd-sysdom0-")
    # a writable loop device even for a read-only mount: ext4 replays its journal then
    # (after a power cut the last writes are only there), a read-only device refuses that
    loop = run(["losetup", "--find", "--show", path], timeout=60).strip()
    try:
        run(["mount", "-t", "ext4", "-o", "ro" if readonly else "rw", loop, mnt], timeout=60)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", mnt], timeout=120, stdin=subprocess.DEVNULL)
    finally:
        subprocess.run(["losetup", "-d", loop], timeout=60, stdin=subprocess.DEVNULL)
        try:
            os.rmdir(mnt)
        except OSError as exc:  # still mounted: leave it for a person, say so
            log("could not remove %s: %s" % (mnt, exc))


def prepare_disk(info, path, files, debs=()):
    """A run's writable disk at `path`: a sparse copy of the image with `files` ({abs
    path: bytes or (bytes, mode)}) in it and `debs` installed by apt inside it."""
    t0 = time.monotonic()
    run(["cp", "--sparse=always", "--reflink=auto", info["image"], path])
    with mounted(path) as mnt:
        put_files(mnt, files)
        if debs:
            install_debs(mnt, debs)
    return round(time.monotonic() - t0, 2)


def install_debs(mnt, debs):
    """`apt-get install -y ./X.deb` in a chroot of the mounted image, as an operator
    would; nothing starts meanwhile (a policy-rc.d, removed afterwards)."""
    tmpdir = "/var/tmp/brbd-debs"
    os.makedirs(mnt + tmpdir, exist_ok=True)
    inside = []
    for deb in debs:
        dest = "%s/%s" % (tmpdir, os.path.basename(deb))
        shutil.copyfile(deb, mnt + dest)
        inside.append(dest)
    policy = mnt + "/usr/sbin/policy-rc.d"
    with open(mnt + "/etc/resolv.conf", "rb") as fh:
        resolv = fh.read()  # in_root puts the host's in
    try:
        put_files(mnt, {"/usr/sbin/policy-rc.d": (b"#!/bin/sh\nexit 101\n", 0o755)})
        log("apt-get install %s" % " ".join(os.path.basename(d) for d in debs))
        # no network: the package's dependencies are in the root already; a conffile the
        # run put in beforehand (its /etc/xen/block-rbd.yaml) stays, as configuration
        # management's would
        run(debianroot.in_root(mnt, ["apt-get", "install", "-y", "-q", "-o", "Acquire::Retries=0",
                                     "-o", "Dpkg::Options::=--force-confdef",
                                     "-o", "Dpkg::Options::=--force-confold"]
                               + inside), env=ENV, timeout=600)
    finally:
        if os.path.lexists(policy):
            os.unlink(policy)
        put_files(mnt, {"/etc/resolv.conf": (resolv, 0o644)})
        shutil.rmtree(mnt + tmpdir, ignore_errors=True)


def read_journal(path, identifier=None, root=None, args=()):
    """The journal a run left on its disk `path` (QEMU gone), `journalctl -o
    short-monotonic` text, only `identifier`'s lines if given.  `root`: a Debian root whose
    journalctl reads it (the image's own release's; default the host's journalctl)."""
    with mounted(path, readonly=True) as mnt:
        argv = ["journalctl", "--no-pager", "-D", mnt + "/var/log/journal", "-o", "short-monotonic"]
        argv += (["-t", identifier] if identifier else []) + list(args)
        if root:
            argv = debianroot.in_root(root, argv, binds=[mnt])
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=120)
        return p.stdout.decode(errors="replace")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find) the image; print its info")
    b.add_argument("--stack", choices=STACKS, default="debian12")
    b.add_argument("--force", action="store_true")
    j = sub.add_parser("journal", help="print the journal a run left on its disk")
    j.add_argument("disk")
    j.add_argument("--stack", choices=STACKS, default="debian12")
    j.add_argument("-t", "--identifier")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        print(json.dumps(build(a.stack, a.force), indent=1))
        return 0
    root = debianroot.build(SUITES[a.stack][0])
    sys.stdout.write(read_journal(a.disk, a.identifier, root=root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
