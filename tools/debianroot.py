#!/usr/bin/python3
"""Cached Debian roots of another release, and running programs inside them.

The test stacks other than this host's (Debian 13: Ceph 18.2, Python 3.13) run from
a root built with debootstrap: the Ceph 18.2 test cluster's daemons, and the host-side
suite under Debian 13's python3 and Ceph bindings.  A root is built once per
(suite, package list) and kept under BLOCK_RBD_ROOT_CACHE (default
/var/cache/block-rbd-roots); the host's own apt configuration is never touched.

A program runs inside a root in a mount namespace of its own: /proc, /sys, /dev and
the directories asked for are mounted at their own paths, then chroot.  The mounts go
away with the namespace's last process, so nothing is left on the host whichever way
the program ends.

CLI:
    python3 tools/debianroot.py build [--suite trixie]     # prints the root's path
    python3 tools/debianroot.py run [--bind DIR ...] [--overlay DIR] [--cwd DIR]
                                    ROOT|--suite S -- PROGRAM [ARG ...]

Stdlib only: it runs under /usr/bin/python3 before anything is installed.
"""

import argparse
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time

__all__ = ["build", "in_root", "root_packages", "DEFAULT_SUITE"]

DEFAULT_CACHE = "/var/cache/block-rbd-roots"
DEFAULT_SUITE = "trixie"
# Raised when what goes into a root changes in a way the package list does not show.
ROOT_FORMAT = 1
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
SOURCES = "/etc/apt/sources.list.d/debian.sources"
# A systemd dom0's packages, both releases (the Xen ones and fuse differ per release).
SYSDOM0 = ["systemd", "systemd-sysv", "udev", "dbus", "linux-image-amd64", "initramfs-tools",
           "xen-utils-common", "xenstore-utils", "ceph-common", "rbd-nbd", "rbd-fuse",
           "python3", "python3-rados", "python3-rbd", "python3-click", "python3-yaml",
           "ifupdown", "iproute2", "iputils-ping", "procps", "kmod", "util-linux", "mount",
           "e2fsprogs",
           # the systemd gate's PV guests are busybox ones
           "busybox-static",
           # ceph-common's snappy compressor plugin needs it (only Recommended)
           "libsnappy1v5"]
# What the Ceph test cluster and the host-side suite need inside the root.
PACKAGES = {
    # plain roots: what a fresh install has, for installing the .deb as a user would
    "bookworm-plain": [],
    "trixie-plain": [],
    # what a Debian 13 Xen dom0 of the gate is made from (tests/xen/build_dom0.py)
    "trixie-dom0": ["xen-hypervisor-4.20-amd64", "xen-utils-4.20", "xen-utils-common",
                    "xenstore-utils", "linux-image-amd64", "busybox-static", "python3",
                    "python3-rados", "python3-rbd", "python3-click", "python3-yaml",
                    "python3-pytest", "python3-pytest-mock", "ceph-common", "rbd-nbd",
                    "rbd-fuse", "fuse3", "mount", "util-linux", "bash", "libext2fs2",
                    "grub-xen-host", "e2fsprogs",
                    # ceph-common's snappy compressor plugin needs it (only Recommended)
                    "libsnappy1v5"],
    # a real (systemd) Xen dom0 booted from a disk image (tests/xen/sysdom0.py); its
    # kernel is also the PV guests'.  The python3-* bindings are block-rbd's Depends, so
    # its .deb installs offline later.
    "bookworm-sysdom0": ["xen-hypervisor-4.17-amd64", "xen-utils-4.17"] + SYSDOM0 + ["fuse"],
    "trixie-sysdom0": ["xen-hypervisor-4.20-amd64", "xen-utils-4.20"] + SYSDOM0 + ["fuse3"],
    "trixie": ["python3", "python3-rados", "python3-rbd", "python3-click", "python3-yaml",
               "python3-pytest", "python3-pytest-mock", "ceph-mon", "ceph-mgr", "ceph-osd",
               "ceph-common", "rbd-fuse", "rbd-nbd", "fuse3", "xenstore-utils",
               "qemu-utils", "util-linux", "mount", "kmod", "iproute2", "procps"],
}
BUILD_TIMEOUT = 1800
HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    print("[debianroot %s] %s" % (time.strftime("%H:%M:%S"), msg), file=sys.stderr, flush=True)


def cache_dir():
    return os.environ.get("BLOCK_RBD_ROOT_CACHE") or DEFAULT_CACHE


def mirror():
    """The Debian mirror of this host's deb822 sources (SOURCES): the one place it is
    written down.  None there: a clear failure, never a mirror of our own choosing."""
    try:
        with open(SOURCES) as f:
            text = f.read()
    except OSError as exc:
        text, why = "", exc.strerror
    else:
        why = "no stanza for bookworm or trixie with a URIs: line"
    for stanza in text.split("\n\n"):
        if re.search(r"^Suites:.*\b(bookworm|trixie)\b", stanza, re.M) and "-security" not in stanza:
            m = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            if m:
                return m.group(1)
    raise SystemExit("no Debian mirror to build a root from: %s: %s (debootstrap takes the mirror this "
                     "host's deb822 apt sources name)" % (SOURCES, why))


def root_packages(suite):
    try:
        return PACKAGES[suite]
    except KeyError:
        raise SystemExit("no package list for suite %r (known: %s)" % (suite, ", ".join(PACKAGES)))


def release(suite):
    """The Debian suite of a root name (trixie-plain -> trixie)."""
    return suite.split("-")[0]


def root_path(suite):
    key = hashlib.sha256(("%d\0%s\0%s" % (ROOT_FORMAT, suite, " ".join(root_packages(suite))))
                         .encode()).hexdigest()[:12]
    return os.path.join(cache_dir(), "%s-%s" % (suite, key))


def _run(argv, **kw):
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT, **kw)
    if p.returncode:
        tail = p.stdout.decode(errors="replace").strip().splitlines()[-15:]
        raise SystemExit("%s failed (exit %d):\n%s" % (argv[0], p.returncode, "\n".join(tail)))
    return p


@contextlib.contextmanager
def locked(path):
    """Hold an exclusive lock on the file `path` (created): builds of one cache by runs
    side by side take turns."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def build(suite=DEFAULT_SUITE, force=False):
    """Return the path of a root of `suite` with the suite's packages, building it once."""
    path = root_path(suite)
    if os.path.isfile(os.path.join(path, ".complete")) and not force:
        return path
    with locked(os.path.join(cache_dir(), suite + ".lock")):
        if os.path.isfile(os.path.join(path, ".complete")) and not force:
            return path  # built by another run while this one waited
        return _build(suite, path)


def _build(suite, path):
    if not shutil.which("debootstrap"):
        raise SystemExit("debootstrap is not installed (apt-get install debootstrap)")
    t0 = time.monotonic()
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    url = mirror()
    log("debootstrap %s from %s into %s" % (suite, url, tmp))
    _run(["debootstrap", "--variant=minbase", "--keyring=" + KEYRING, release(suite), tmp, url])
    # Daemons must not start inside the root while packages are installed.
    with open(os.path.join(tmp, "usr/sbin/policy-rc.d"), "w") as f:
        f.write("#!/bin/sh\nexit 101\n")
    os.chmod(os.path.join(tmp, "usr/sbin/policy-rc.d"), 0o755)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
           "LC_ALL": "C.UTF-8"}
    if root_packages(suite):
        log("installing %d packages" % len(root_packages(suite)))
        _run(in_root(tmp, ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
                     + root_packages(suite)), env=env)
    _run(in_root(tmp, ["apt-get", "clean"]), env=env)
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write("%s %s\n" % (suite, " ".join(root_packages(suite))))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    # a root of the same suite built from another package list is not used any more
    for old in os.listdir(cache_dir()):
        if re.fullmatch(re.escape(suite) + r"-[0-9a-f]{12}", old) and old != os.path.basename(path):
            shutil.rmtree(os.path.join(cache_dir(), old), ignore_errors=True)
    log("built %s in %.0f s" % (path, time.monotonic() - t0))
    return path


def in_root(root, argv, binds=(), overlay=None, cwd=None):
    """argv that runs `argv` inside `root`, with `binds` (host paths) at their own paths
    (or "SRC:DEST" at DEST).

    overlay: a directory that takes every change the program makes to the root (an
    overlay filesystem's upper layer), so a cached root stays as it was built.
    """
    cmd = ["unshare", "--mount", "--propagation", "private", "--",
           sys.executable if os.path.isabs(sys.executable) else "/usr/bin/python3",
           os.path.join(HERE, "debianroot.py"), "_enter"]
    for b in binds:
        src, _, dest = b.partition(":")
        cmd += ["--bind", os.path.abspath(src) + (":" + dest if dest else "")]
    if overlay:
        cmd += ["--overlay", os.path.abspath(overlay)]
    if cwd:
        cmd += ["--cwd", cwd]
    return cmd + [root, "--"] + list(argv)


def _mount(args):
    # argv only; mount(8) reports its own errors
    subprocess.run(["mount"] + args, check=True, stdin=subprocess.DEVNULL)


def _enter(root, binds, argv, overlay=None, cwd=None):
    """In the new mount namespace: bind what the program needs, chroot, exec it."""
    root = os.path.abspath(root)
    if overlay:
        merged = os.path.join(overlay, "merged")
        for sub in ("upper", "work", "merged"):
            os.makedirs(os.path.join(overlay, sub), exist_ok=True)
        _mount(["-t", "overlay", "overlay", "-o", "lowerdir=%s,upperdir=%s/upper,workdir=%s/work"
                % (root, overlay, overlay), merged])
        root = merged
    for src, fstype in (("/proc", "proc"), ("/sys", "sysfs")):
        os.makedirs(root + src, exist_ok=True)
        _mount(["-t", fstype, fstype, root + src])
    os.makedirs(root + "/dev", exist_ok=True)
    _mount(["--rbind", "/dev", root + "/dev"])
    for b in binds:
        src, _, dest = b.partition(":")
        dest = root + (dest or src)
        if os.path.isdir(src):
            os.makedirs(dest, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            open(dest, "a").close()
        _mount(["--bind", src, dest])
    if os.path.exists("/etc/resolv.conf"):
        shutil.copyfile("/etc/resolv.conf", root + "/etc/resolv.conf")
    os.chroot(root)
    # the root's own programs, whatever the host's PATH holds
    os.environ["PATH"] = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    os.chdir(cwd if cwd and os.path.isdir(cwd) else "/")
    os.execvp(argv[0], argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    # the program's own arguments follow "--": argparse never sees them
    program = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build (or find) the root; print its path")
    b.add_argument("--suite", default=DEFAULT_SUITE)
    b.add_argument("--force", action="store_true")
    r = sub.add_parser("run", help="run a program inside a root: run [options] ROOT -- PROGRAM ...")
    r.add_argument("--suite", help="the root of this suite (built if need be) instead of ROOT")
    e = sub.add_parser("_enter")  # the second half of run, inside the namespace
    for p in (r, e):
        p.add_argument("root", nargs="?" if p is r else None)
        p.add_argument("--bind", action="append", default=[])
        p.add_argument("--overlay", help="a directory that takes the program's changes to the root")
        p.add_argument("--cwd", help="directory to start the program in (inside the root)")
    a = ap.parse_args(argv)
    if a.cmd == "build":
        print(build(a.suite, a.force))
        return 0
    if not program:
        ap.error("no program given after --")
    if a.cmd == "_enter":
        _enter(a.root, a.bind, program, a.overlay, a.cwd)
    if bool(a.root) == bool(a.suite):
        ap.error("give ROOT or --suite")
    root = a.root or build(a.suite)
    os.execvp("unshare", in_root(root, program, a.bind, a.overlay, a.cwd))


if __name__ == "__main__":
    sys.exit(main())
