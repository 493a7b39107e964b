#!/usr/bin/python3
"""Build the Xen-in-QEMU boot set: xen.elf, the dom0 kernel and a busybox dom0 initramfs.

Nothing is installed on the host: the Xen hypervisor, dom0 kernel, Xen tools and
busybox-static come from `apt-get download` + `dpkg-deb -x` into a cache directory
(BLOCK_RBD_XEN_CACHE, default /var/cache/block-rbd-xen).  Ceph client tools, python3 and
the Python bindings are taken from the host's installed Debian packages (the project
installs them anyway) and recorded by version.

Outputs are cached by a hash of their inputs:
  out/base-<hash>/      xen.elf, vmlinuz, base.cpio.gz   (package versions + dom0/ files)
  out/checkout-<hash>.cpio.gz    block-rbd's .deb (`make deb`) unpacked, the checkout in /opt
  out/dom0-<hash>.cpio.gz  the two concatenated (the kernel unpacks both members)

CLI:  python3 tests/xen/build_dom0.py [--checkout DIR] [--force] [--json]
"""

import argparse
import glob
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "tools"))
import debianroot  # noqa: E402
from cpio import CpioWriter, write_tree  # noqa: E402

DEFAULT_CACHE = "/var/cache/block-rbd-xen"
XEN_VER = "4.17"

# Packages fetched with apt-get download (never installed on the host).
DEB_PACKAGES = [
    "xen-hypervisor-4.17-amd64",
    "@KERNEL@",
    "xen-utils-4.17",
    "xen-utils-common",
    "xenstore-utils",
    "busybox-static",
    "libxenmisc4.17",
    "libxencall1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxenstore4",
    "libxentoollog1",
    "libxendevicemodel1",
    "libxentoolcore1",
    "libxenhypfs1",
    "libyajl2",
    "grub-xen-host",  # PV-Grub: grub-x86_64-xen.bin
]

# Host packages whose files go into dom0 (versions feed the cache key).
HOST_PACKAGES = [
    "python3.11", "libpython3.11-stdlib", "python3-rados", "python3-rbd", "python3-click",
    "python3-yaml", "ceph-common", "rbd-nbd", "librados2", "librbd1", "bash", "libc6",
    "libgcc-s1", "coreutils", "mount", "util-linux",
    # pytest in dom0 (the hotplug-path tests against the real xenstored)
    "python3-pytest", "python3-pytest-mock", "python3-pluggy", "python3-iniconfig",
    "python3-packaging", "python3-py", "python3-attr",
    # pygrub's ext2/3/4 plugin (libxenfsimage's ext2fs-lib)
    "libext2fs2",
    # the fuse mapper (rbd-fuse + loop)
    "rbd-fuse", "fuse", "libfuse2",
]

KMOD_ROOTS = [
    "xenfs", "xen-evtchn", "xen-gntdev", "xen-gntalloc", "xen-privcmd", "xen-blkback",
    "xen-blkfront", "loop", "rbd", "nbd", "fuse", "e1000", "virtio_pci", "virtio_net",
    "libceph", "libcrc32c", "crc32c_generic", "crc32c-intel", "dns_resolver",
    # ms_mode=secure needs these (facts file); cheap to carry.
    "gcm", "ghash-generic", "ctr", "seqiv",
]

XEN_BINS = ["xl", "xenstored", "xen-init-dom0", "xenconsoled", "xenconsole",
            "libxl-save-helper"]
XENSTORE_TOOLS = ["xenstore", "xenstore-read", "xenstore-write", "xenstore-rm",
                  "xenstore-list", "xenstore-ls", "xenstore-exists", "xenstore-chmod",
                  "xenstore-watch"]
HOST_BINS = ["/usr/bin/bash", "/usr/bin/rbd", "/usr/bin/rbd-nbd", "/usr/bin/python3.11",
             "/usr/bin/setsid", "/usr/sbin/losetup", "/usr/bin/flock", "/usr/sbin/blockdev",
             "/usr/bin/stat", "/usr/bin/readlink", "/usr/bin/rbd-fuse", "/usr/bin/fusermount"]
PY_STDLIB = "/usr/lib/python3.11"
PY_STDLIB_EXCLUDE = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3",
                     "config-3.11-x86_64-linux-gnu", "pydoc_data", "unittest/test",
                     "distutils/tests", "ctypes/test", "sqlite3/test", "tkinter/test"}
PY_DIST = "/usr/lib/python3/dist-packages"
PY_DIST_ITEMS = ["rados.cpython-311-x86_64-linux-gnu.so", "rbd.cpython-311-x86_64-linux-gnu.so",
                 "click", "yaml", "_yaml",
                 # pytest 7 and what it imports; the *-info dirs carry the pytest11 entry
                 # point that loads pytest-mock's `mocker`
                 "pytest", "_pytest", "pluggy", "iniconfig", "packaging", "py", "py.py",
                 "pytest_mock", "attr", "attrs", "*pytest*-info", "pluggy*-info",
                 "iniconfig*-info", "packaging*-info", "py-*-info", "attrs*-info"]
# pygrub (libxl runs it for bootloader="pygrub"): the script, its python modules next to
# it, libxenfsimage and its ext2fs plugin, all at the paths they were built for.
XEN_PRIV = f"usr/lib/xen-{XEN_VER}"
PYGRUB_FILES = [("xen-utils-4.17", f"{XEN_PRIV}/bin/pygrub"),
                ("xen-utils-4.17", f"{XEN_PRIV}/lib/python/grub"),
                ("xen-utils-4.17", f"{XEN_PRIV}/lib/python/xenfsimage.cpython-311-x86_64-linux-gnu.so"),
                ("libxenmisc4.17", f"{XEN_PRIV}/lib/x86_64-linux-gnu/libxenfsimage.so.4.17"),
                ("libxenmisc4.17", f"{XEN_PRIV}/lib/x86_64-linux-gnu/xenfsimage/ext2fs-lib/fsimage.so")]
EXTRA_HOST_LIBS = ["/usr/lib/x86_64-linux-gnu/libgcc_s.so.1"]
EXTRA_HOST_DIRS = ["/usr/lib/x86_64-linux-gnu/ceph/crypto",
                   "/usr/lib/x86_64-linux-gnu/ceph/compressor"]

CMD_TIMEOUT = 600
# GRUB for Xen (grub-xen-host): a PV guest's kernel that reads /boot/grub/grub.cfg from its disk
PVGRUB = "/usr/lib/grub-xen/grub-x86_64-xen.bin"


def log(msg):
    print(f"[build_dom0 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(argv, timeout=CMD_TIMEOUT, **kw):
    return subprocess.run(argv, check=True, timeout=timeout, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


def cache_dir():
    return os.environ.get("BLOCK_RBD_XEN_CACHE") or DEFAULT_CACHE


def sha(parts):
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- package resolution
def resolve_packages():
    out = run(["apt-cache", "depends", "--no-recommends", "--no-suggests",
               "linux-image-amd64"]).stdout
    m = re.search(r"Depends: (linux-image-6\.1\.0-\d+-amd64)\b", out)
    if not m:
        raise RuntimeError(f"cannot resolve linux-image-amd64: {out!r}")
    kernel = m.group(1)
    names = [kernel if p == "@KERNEL@" else p for p in DEB_PACKAGES]
    pol = run(["apt-cache", "policy"] + names).stdout
    versions, cur = {}, None
    for line in pol.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            cur = line[:-1].split(":")[0]
        elif cur and line.strip().startswith("Candidate:"):
            versions[cur] = line.split(":", 1)[1].strip()
    missing = [n for n in names if versions.get(n) in (None, "(none)")]
    if missing:
        raise RuntimeError(f"no candidate for {missing}; run apt-get update")
    return kernel, {n: versions[n] for n in names}


def host_versions():
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version} ${Status}\n"]
                         + HOST_PACKAGES, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, timeout=60)
    vers = {}
    for line in out.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and "installed" in parts[2] and "not-installed" not in parts[2]:
            vers[parts[0]] = parts[1]
    missing = [p for p in HOST_PACKAGES if p not in vers]
    if missing:
        raise RuntimeError(f"host packages missing (apt-get install them): {missing}")
    return vers


def fetch_and_extract(cache, versions):
    with debianroot.locked(os.path.join(cache, "extract.lock")):  # runs side by side
        return _fetch_and_extract(cache, versions)


def _fetch_and_extract(cache, versions):
    debs = os.path.join(cache, "debs")
    ext = os.path.join(cache, "extract")
    os.makedirs(debs, exist_ok=True)
    os.makedirs(ext, exist_ok=True)
    roots = {}
    want = []
    for name, ver in versions.items():
        pattern = os.path.join(debs, f"{name}_*.deb")
        found = [f for f in glob.glob(pattern) if deb_version(f) == ver]
        if not found:
            want.append(f"{name}={ver}")
    if want:
        log(f"apt-get download {' '.join(want)}")
        # apt drops privileges to _apt; let it write into the directory.
        try:
            shutil.chown(debs, user="_apt")
        except (LookupError, PermissionError, OSError):
            pass
        run(["apt-get", "download", "-q"] + want, cwd=debs, timeout=900)
    for name, ver in versions.items():
        deb = [f for f in glob.glob(os.path.join(debs, f"{name}_*.deb")) if deb_version(f) == ver]
        if not deb:
            raise RuntimeError(f"download of {name}={ver} did not produce a .deb")
        root = os.path.join(ext, f"{name}_{ver.replace(':', '%3a')}")
        if not os.path.exists(root + ".done"):
            shutil.rmtree(root, ignore_errors=True)
            run(["dpkg-deb", "-x", deb[0], root])
            open(root + ".done", "w").close()
        roots[name] = root
    return roots


def deb_version(path):
    base = os.path.basename(path)[:-4]
    parts = base.split("_")
    return parts[1].replace("%3a", ":") if len(parts) >= 3 else None


# ---------------------------------------------------------------- ELF / kernel modules
def module_bytes(path):
    """A module's ELF image: Debian 13 keeps them xz-compressed (.ko.xz)."""
    import lzma
    with open(path, "rb") as fh:
        data = fh.read()
    return lzma.decompress(data) if path.endswith(".xz") else data


def modinfo_depends(path):
    """`depends=` from the .modinfo section of a .ko (parsed, so no modinfo is needed)."""
    import struct
    data = module_bytes(path)
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise RuntimeError(f"not ELF64: {path}")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def sh(i):
        off = shoff + i * shentsize
        name, _t, _f, _a, offset, size = struct.unpack_from("<IIQQQQ", data, off)
        return name, offset, size

    _n, stroff, _s = sh(shstrndx)
    for i in range(shnum):
        name, offset, size = sh(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            for item in data[offset:offset + size].split(b"\0"):
                if item.startswith(b"depends="):
                    val = item[len(b"depends="):].decode()
                    return [d for d in val.split(",") if d]
            return []
    return []


def module_closure(modroot, wanted=KMOD_ROOTS):
    """{module: .ko path} of `wanted` and everything they depend on (built-ins left out)."""
    index = {}
    for path in glob.glob(os.path.join(modroot, "kernel", "**", "*.ko*"), recursive=True):
        name = os.path.basename(path)
        if name.endswith((".ko", ".ko.xz")):
            index[name.split(".ko")[0].replace("-", "_")] = path
    todo = [m.replace("-", "_") for m in wanted]
    chosen = {}
    builtin = set()
    with open(os.path.join(modroot, "modules.builtin")) as fh:
        for line in fh:
            builtin.add(os.path.basename(line.strip()).split(".ko")[0].replace("-", "_"))
    while todo:
        m = todo.pop()
        if m in chosen:
            continue
        if m not in index:
            if m in builtin:
                continue
            raise RuntimeError(f"kernel module {m} not found")
        chosen[m] = index[m]
        todo.extend(d.replace("-", "_") for d in modinfo_depends(index[m]))
    return chosen


def put_modules(R, modroot, kver, wanted=KMOD_ROOTS):
    """`wanted` and their dependencies into R's /usr/lib/modules/KVER, decompressed (busybox
    modprobe loads plain .ko files only), indexed by busybox depmod; returns the modules."""
    mods = module_closure(modroot, wanted)
    for name, path in sorted(mods.items()):
        rel = os.path.relpath(path, modroot)
        dest = os.path.join(R, "usr/lib/modules", kver, rel[:-3] if rel.endswith(".xz") else rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as fh:
            fh.write(module_bytes(path))
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if os.path.exists(os.path.join(modroot, f)):
            shutil.copyfile(os.path.join(modroot, f), os.path.join(R, "usr/lib/modules", kver, f))
    run([os.path.join(R, "usr/bin/busybox"), "depmod", "-b", R, kver])
    return mods


# ---------------------------------------------------------------- library closure
def ldd(path, libpath, sysroot=None):
    """Libraries `path` loads; with sysroot, as that root's loader sees them (paths in it)."""
    env = {"PATH": "/usr/bin:/bin", "LD_LIBRARY_PATH": ":".join(libpath)}
    argv = ["/usr/sbin/chroot", sysroot, "ldd", path] if sysroot else ["ldd", path]
    p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=60, env=env)
    if p.returncode != 0:
        if "not a dynamic executable" in p.stdout + p.stderr:
            return []
        raise RuntimeError(f"ldd {path}: {p.stdout}{p.stderr}")
    libs = []
    for line in p.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            raise RuntimeError(f"ldd {path}: {line}")
        m = re.match(r"\S+ => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
        if m:
            libs.append(m.group(1))
    return libs


def usr_path(p):
    for pre in ("/lib64/", "/lib/", "/bin/", "/sbin/"):
        if p.startswith(pre):
            return "/usr" + p
    return p


class Stage:
    def __init__(self, root, ext_roots):
        self.root = root
        self.ext_roots = ext_roots  # extracted package roots
        self.libpath = []
        for r in ext_roots:
            for sub in ("usr/lib/x86_64-linux-gnu", "lib/x86_64-linux-gnu"):
                if os.path.isdir(os.path.join(r, sub)):
                    self.libpath.append(os.path.join(r, sub))
        self.done_libs = set()

    def dest_of(self, src):
        for r in self.ext_roots:
            if src.startswith(r + "/"):
                return usr_path("/" + os.path.relpath(src, r))
        return usr_path(src)

    def put_file(self, src, dest=None, mode=None):
        dest = dest or self.dest_of(src)
        full = self.root + dest
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if os.path.lexists(full):
            os.unlink(full)
        shutil.copyfile(src, full)  # follows symlinks: content at the listed name
        os.chmod(full, mode if mode is not None else (os.stat(src).st_mode & 0o7777))
        return dest

    def symlink(self, dest, target):
        full = self.root + dest
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if os.path.lexists(full):
            os.unlink(full)
        os.symlink(target, full)

    def write(self, dest, text, mode=0o644):
        full = self.root + dest
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as fh:
            fh.write(text)
        os.chmod(full, mode)

    def with_libs(self, src, dest=None, mode=None):
        d = self.put_file(src, dest, mode)
        self.libs_of(src)
        return d

    def libs_of(self, src):
        for lib in ldd(src, self.libpath):
            if lib in self.done_libs:
                continue
            self.done_libs.add(lib)
            self.put_file(lib)
            self.libs_of(lib)


# ---------------------------------------------------------------- the build
def base_inputs(versions, hostvers):
    files = [os.path.join(HERE, "build_dom0.py"), os.path.join(HERE, "cpio.py")]
    parts = [json.dumps(versions, sort_keys=True), json.dumps(hostvers, sort_keys=True)]
    for f in files:
        with open(f, "rb") as fh:
            parts += [os.path.basename(f), fh.read()]
    return sha(parts)


def skeleton(R):
    """The directories and links every dom0 starts from: merged /usr, like Debian."""
    for d in ("usr/bin", "usr/sbin", "usr/lib64", "usr/lib/x86_64-linux-gnu", "proc", "sys",
              "dev", "run", "tmp", "root", "mnt", "etc/xen/scripts", "var/log/xen/console",
              "var/lib/xen", "var/lib/xenstored", "var/tmp", "brbd/out", "brbd/run",
              "brbd/ceph", "brbd/tmp"):
        os.makedirs(os.path.join(R, d), exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                         ("lib64", "usr/lib64")):
        os.symlink(target, os.path.join(R, link))
    os.symlink("../run", os.path.join(R, "var/run"))
    os.chmod(os.path.join(R, "tmp"), 0o1777)


def config_files(st, kver, versions, mods):
    """/etc files (/init itself comes in the small dom0-files layer)."""
    st.write("/etc/passwd", "root:x:0:0:root:/root:/bin/sh\n")
    st.write("/etc/group", "root:x:0:\ndisk:x:6:\n")
    st.write("/etc/hosts", "127.0.0.1 localhost\n10.250.250.2 dom0\n")
    st.write("/etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files\n")
    st.write("/etc/brbd-kernel-version", kver + "\n")
    st.write("/etc/brbd-manifest.json", json.dumps(
        {"packages": versions, "modules": sorted(mods)}, indent=1, sort_keys=True))


def pack_base(R, outdir):
    buf = io.BytesIO()
    w = CpioWriter(buf)
    write_tree(w, R)
    w.close()
    raw = buf.getvalue()
    with open(os.path.join(outdir + ".tmp", "base.cpio.gz"), "wb") as fh:
        fh.write(gzip.compress(raw, compresslevel=1, mtime=0))
    return len(raw)


def finish_base(st, applets, kver, versions, mods, outdir, t0, what):
    """What every base ends with: the libraries of Python's extension modules, busybox
    applet links where nothing real is installed, /etc, the packed cpio."""
    R = st.root
    for so in sorted(glob.glob(R + "/usr/lib/python3*/**/*.so", recursive=True)):
        st.libs_of(so[len(R):])
    for a in applets:
        dest = usr_path("/" + a)
        if not os.path.lexists(R + dest):
            st.symlink(dest, "/usr/bin/busybox")
    config_files(st, kver, versions, mods)
    raw = pack_base(R, outdir)
    shutil.rmtree(R)
    log(f"base initramfs ({what}): {raw / 1e6:.1f} MB raw, {len(mods)} modules, "
        f"{time.time() - t0:.1f}s")


def build_base(cache, kernel, versions, roots, outdir):
    t0 = time.time()
    stage_dir = outdir + ".stage"
    shutil.rmtree(stage_dir, ignore_errors=True)
    os.makedirs(stage_dir)
    ext_roots = [roots[n] for n in versions]
    st = Stage(stage_dir, ext_roots)
    R = stage_dir
    skeleton(R)

    # busybox and its applets
    bb_root = roots["busybox-static"]
    bb = os.path.join(bb_root, "bin/busybox")
    st.put_file(bb, "/usr/bin/busybox", 0o755)
    applets = run([bb, "--list-full"]).stdout.split()

    # Xen hypervisor + dom0 kernel
    xen_root = roots["xen-hypervisor-4.17-amd64"]
    with gzip.open(os.path.join(xen_root, f"boot/xen-{XEN_VER}-amd64.gz")) as fh:
        xen_elf = fh.read()
    with open(os.path.join(outdir + ".tmp", "xen.elf"), "wb") as fh:
        fh.write(xen_elf)
    kroot = roots[kernel]
    kver = kernel[len("linux-image-"):]
    shutil.copyfile(os.path.join(kroot, f"boot/vmlinuz-{kver}"),
                    os.path.join(outdir + ".tmp", "vmlinuz"))

    # kernel modules by dependency closure
    mods = put_modules(R, os.path.join(kroot, "lib/modules", kver), kver)

    # Xen tools
    xu = roots["xen-utils-4.17"]
    for b in XEN_BINS:
        d = st.with_libs(os.path.join(xu, f"usr/lib/xen-{XEN_VER}/bin", b))
        st.symlink(f"/usr/sbin/{b}", d)
    xs = roots["xenstore-utils"]
    for b in XENSTORE_TOOLS:
        st.with_libs(os.path.join(xs, "usr/bin", b))
    xc = roots["xen-utils-common"]
    for f in glob.glob(os.path.join(xc, "etc/xen/scripts/*")):
        st.put_file(f)
    st.put_file(os.path.join(xc, "etc/xen/xl.conf"))

    # host binaries, python, ceph client
    for b in HOST_BINS:
        st.with_libs(b)
    st.symlink("/usr/bin/python3", "python3.11")
    st.symlink("/usr/bin/sh", "busybox")  # bash is there, but /bin/sh stays busybox ash
    for lib in EXTRA_HOST_LIBS:
        st.put_file(lib)
    for d in EXTRA_HOST_DIRS:
        for f in sorted(glob.glob(os.path.join(d, "*.so*"))):
            st.with_libs(f)
    copy_tree(PY_STDLIB, R + PY_STDLIB, PY_STDLIB_EXCLUDE)
    for pattern in PY_DIST_ITEMS:
        matches = sorted(glob.glob(os.path.join(PY_DIST, pattern)))
        if not matches:
            raise RuntimeError(f"{PY_DIST}/{pattern} missing (apt-get install the package)")
        for src in matches:
            if os.path.isdir(src):
                copy_tree(src, R + src, set())
            else:
                st.put_file(src)
    xen_libdir = os.path.join(roots["libxenmisc4.17"], XEN_PRIV, "lib/x86_64-linux-gnu")
    st.libpath.append(xen_libdir)
    for pkg, rel in PYGRUB_FILES:
        src = os.path.join(roots[pkg], rel)
        if os.path.isdir(src):
            copy_tree(src, R + "/" + rel, set())
        else:
            st.with_libs(src, "/" + rel)
    st.put_file(os.path.join(roots["grub-xen-host"], PVGRUB.lstrip("/")), PVGRUB, 0o644)
    finish_base(st, applets, kver, versions, mods, outdir, t0, "Debian 12")


# ---------------------------------------------------------------- Debian 13 (from a root)
# The Debian 13 dom0 is taken whole from a root tools/debianroot.py builds with Debian 13's
# packages (Xen 4.20, Linux 6.12, Python 3.13, Ceph 18.2): paths below are inside it.
ROOT13_SUITE = "trixie-dom0"
XEN13 = "4.20"
PY13 = "python3.13"
BINS13 = ["/usr/bin/bash", "/usr/bin/rbd", "/usr/bin/rbd-nbd", f"/usr/bin/{PY13}", "/usr/bin/setsid",
          "/usr/sbin/losetup", "/usr/bin/flock", "/usr/sbin/blockdev", "/usr/bin/stat",
          "/usr/bin/readlink", "/usr/bin/rbd-fuse", "/usr/bin/fusermount3"]
PY13_DIST_ITEMS = ["rados.cpython-313-x86_64-linux-gnu.so", "rbd.cpython-313-x86_64-linux-gnu.so",
                   "click", "yaml", "_yaml", "pytest", "_pytest", "pluggy", "iniconfig", "packaging",
                   "py.py", "pytest_mock", "*pytest*-info", "pluggy*-info", "iniconfig*-info",
                   "packaging*-info"]
XEN13_PRIV = f"/usr/lib/xen-{XEN13}"
PYGRUB13 = [f"{XEN13_PRIV}/bin/pygrub", f"{XEN13_PRIV}/lib/python/grub",
            f"{XEN13_PRIV}/lib/python/xenfsimage.cpython-313-x86_64-linux-gnu.so",
            f"{XEN13_PRIV}/lib/x86_64-linux-gnu/libxenfsimage.so.{XEN13}",
            f"{XEN13_PRIV}/lib/x86_64-linux-gnu/xenfsimage/ext2fs-lib/fsimage.so"]


def root_versions(sysroot):
    out = run(["chroot", sysroot, "dpkg-query", "-W", "-f", "${Package} ${Version}\n"]).stdout
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


class RootStage(Stage):
    """A Stage whose sources are paths inside `sysroot`, resolved by that root's loader."""

    def __init__(self, root, sysroot):
        super().__init__(root, [])
        self.sysroot = sysroot

    def put_file(self, src, dest=None, mode=None):
        full = self.sysroot + src
        return super().put_file(full, dest or usr_path(src),
                                mode if mode is not None else os.stat(full).st_mode & 0o7777)

    def libs_of(self, src):
        for lib in ldd(src, [], sysroot=self.sysroot):
            if lib in self.done_libs:
                continue
            self.done_libs.add(lib)
            self.put_file(lib)
            self.libs_of(lib)


def build_base_root(sysroot, versions, outdir):
    """The Debian 13 base: like build_base, every file from `sysroot`."""
    t0 = time.time()
    stage_dir = outdir + ".stage"
    shutil.rmtree(stage_dir, ignore_errors=True)
    os.makedirs(stage_dir)
    st = RootStage(stage_dir, sysroot)
    R = stage_dir
    skeleton(R)
    st.put_file("/usr/bin/busybox", "/usr/bin/busybox", 0o755)
    applets = run(["chroot", sysroot, "/usr/bin/busybox", "--list-full"]).stdout.split()

    with gzip.open(sysroot + f"/boot/xen-{XEN13}-amd64.gz") as fh:
        xen_elf = fh.read()
    with open(os.path.join(outdir + ".tmp", "xen.elf"), "wb") as fh:
        fh.write(xen_elf)
    kernels = sorted(glob.glob(sysroot + "/boot/vmlinuz-*"))
    if len(kernels) != 1:
        raise RuntimeError(f"expected one kernel in {sysroot}/boot, found {kernels}")
    kver = os.path.basename(kernels[0])[len("vmlinuz-"):]
    shutil.copyfile(kernels[0], os.path.join(outdir + ".tmp", "vmlinuz"))

    mods = put_modules(R, sysroot + f"/usr/lib/modules/{kver}", kver)

    for b in XEN_BINS:
        d = st.with_libs(f"{XEN13_PRIV}/bin/{b}")
        st.symlink(f"/usr/sbin/{b}", d)
    for b in XENSTORE_TOOLS:
        st.with_libs(f"/usr/bin/{b}")
    for f in sorted(glob.glob(sysroot + "/etc/xen/scripts/*")):
        st.put_file(f[len(sysroot):])
    st.put_file("/etc/xen/xl.conf")

    for b in BINS13:
        st.with_libs(b)
    st.symlink("/usr/bin/python3", PY13)
    st.symlink("/usr/bin/fusermount", "fusermount3")  # as Debian 13's fuse3 links it
    st.symlink("/usr/bin/sh", "busybox")
    st.put_file("/usr/lib/x86_64-linux-gnu/libgcc_s.so.1")
    for d in ("/usr/lib/x86_64-linux-gnu/ceph/crypto", "/usr/lib/x86_64-linux-gnu/ceph/compressor"):
        for f in sorted(glob.glob(sysroot + d + "/*.so*")):
            st.with_libs(f[len(sysroot):])
    stdlib = f"/usr/lib/{PY13}"
    copy_tree(sysroot + stdlib, R + stdlib,
              {x.replace("3.11", "3.13") for x in PY_STDLIB_EXCLUDE})
    for pattern in PY13_DIST_ITEMS:
        matches = sorted(glob.glob(sysroot + PY_DIST + "/" + pattern))
        if not matches:
            raise RuntimeError(f"{sysroot}{PY_DIST}/{pattern} missing")
        for src in matches:
            if os.path.isdir(src):
                copy_tree(src, R + src[len(sysroot):], set())
            else:
                st.put_file(src[len(sysroot):])
    for rel in PYGRUB13:
        if os.path.isdir(sysroot + rel):
            copy_tree(sysroot + rel, R + rel, set())
        else:
            st.with_libs(rel, rel)
    st.put_file(PVGRUB, PVGRUB, 0o644)
    finish_base(st, applets, kver, versions, mods, outdir, t0, "Debian 13")


def copy_tree(src, dst, exclude):
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        dirnames[:] = sorted(d for d in dirnames
                             if os.path.normpath(os.path.join(rel, d)) not in exclude)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for f in filenames:
            s = os.path.join(dirpath, f)
            d = os.path.join(dst, rel, f)
            if os.path.islink(s):
                os.symlink(os.readlink(s), d)
            else:
                shutil.copy2(s, d)


CHECKOUT_DIRS = ["block_rbd", "scripts", "etc"]


def checkout_files(checkout):
    files = []
    for d in CHECKOUT_DIRS:
        top = os.path.join(checkout, d)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(x for x in dirnames if x != "__pycache__")
            for f in sorted(filenames):
                if f.endswith((".pyc", ".pyo")):
                    continue
                files.append(os.path.relpath(os.path.join(dirpath, f), checkout))
    return sorted(files)


MERGED_USR = ("bin", "sbin", "lib", "lib64")


def build_package(checkout):
    """`make deb` in the checkout: the package dom0 gets, as an operator installs it."""
    run(["make", "-s", "-C", checkout, "deb"])
    debs = glob.glob(os.path.join(checkout, "dist", "block-rbd_*_all.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"make deb left {debs or 'no package'} in {checkout}/dist")
    return debs[0]


def unpack_package(w, deb):
    """The package's files into the cpio as dpkg would unpack them (busybox dom0s have no
    dpkg; its maintainer scripts only enable systemd units, which these dom0s do not run)."""
    tarball = subprocess.run(["dpkg-deb", "--fsys-tarfile", deb], check=True,
                             stdout=subprocess.PIPE, timeout=CMD_TIMEOUT).stdout
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        for m in tar.getmembers():
            path = "/" + os.path.normpath(m.name).lstrip("./")
            if path == "/":
                continue
            # dom0's /lib is a link to usr/lib, as on merged-/usr Debian: dpkg writes through
            # it, and a directory entry for /lib would make the kernel's unpacker replace it
            top, _, rest = path[1:].partition("/")
            if top in MERGED_USR:
                path = "/usr/" + top + ("/" + rest if rest else "")
            if m.isdir():
                w.ensure_parents(path)
                w.directory(path, m.mode & 0o7777)
            elif m.issym():
                w.ensure_parents(path)
                w.symlink(path, m.linkname)
            elif m.isfile():
                w.ensure_parents(path)
                w.file(path, tar.extractfile(m).read(), m.mode & 0o7777)


def build_checkout_cpio(checkout, deb, path):
    """block-rbd from its package, and the checkout under /opt/block-rbd for dom0's pytest."""
    buf = io.BytesIO()
    w = CpioWriter(buf)
    for rel in checkout_files(checkout):
        with open(os.path.join(checkout, rel), "rb") as fh:
            data = fh.read()
        mode = os.stat(os.path.join(checkout, rel)).st_mode & 0o777
        w.ensure_parents("/opt/block-rbd/" + rel)
        w.file("/opt/block-rbd/" + rel, data, mode)
    unpack_package(w, deb)
    w.close()
    with open(path + ".tmp", "wb") as fh:
        fh.write(gzip.compress(buf.getvalue(), compresslevel=1, mtime=0))
    os.replace(path + ".tmp", path)


def build_dom0_files_cpio(path):
    buf = io.BytesIO()
    w = CpioWriter(buf)
    w.directory("usr/lib/brbd")
    for f in sorted(glob.glob(os.path.join(HERE, "dom0", "*"))):
        with open(f, "rb") as fh:
            data = fh.read()
        name = os.path.basename(f)
        if name == "init":
            w.file("/init", data, 0o755)
        else:
            w.file("/usr/lib/brbd/" + name, data, 0o755)
    w.close()
    with open(path + ".tmp", "wb") as fh:
        fh.write(gzip.compress(buf.getvalue(), compresslevel=1, mtime=0))
    os.replace(path + ".tmp", path)


def prune(outroot, keep, per_kind=3):
    """Keep the cache bounded: the current outputs plus the newest few of each kind."""
    for kind in ("base-", "checkout-", "dom0files-", "dom0-"):
        items = [os.path.join(outroot, n) for n in os.listdir(outroot)
                 if n.startswith(kind) and not n.endswith((".tmp", ".stage"))]
        items.sort(key=os.path.getmtime, reverse=True)
        for old in [i for i in items if i not in keep][per_kind - 1:]:
            if os.path.isdir(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                try:
                    os.unlink(old)
                except FileNotFoundError:
                    pass


STACKS = ("debian12", "debian13")


def build(checkout=None, force=False, stack="debian12"):
    """Build (or reuse) the boot set of `stack`; return a dict of paths and timings.

    debian12: Xen 4.17, Linux 6.1, Python 3.11, Ceph 16.2 client (this host's packages);
    debian13: Xen 4.20, Linux 6.12, Python 3.13, Ceph 18.2 client (a Debian 13 root).
    """
    # one build at a time: runs side by side share the cache and the checkout's `make deb`
    with debianroot.locked(os.path.join(cache_dir(), "build.lock")):
        return _build(checkout, force, stack)


def _build(checkout, force, stack):
    t0 = time.time()
    cache = cache_dir()
    os.makedirs(os.path.join(cache, "out"), exist_ok=True)
    if stack == "debian13":
        sysroot = debianroot.build(ROOT13_SUITE)
        versions = root_versions(sysroot)
        bkey = base_inputs(versions, {"stack": stack})
    elif stack == "debian12":
        kernel, versions = resolve_packages()
        bkey = base_inputs(versions, host_versions())
    else:
        raise ValueError(f"unknown stack {stack!r} (known: {', '.join(STACKS)})")
    outdir = os.path.join(cache, "out", f"base-{bkey}")
    base_cached = os.path.isdir(outdir) and not force
    if not base_cached:
        shutil.rmtree(outdir + ".tmp", ignore_errors=True)
        os.makedirs(outdir + ".tmp")
        if stack == "debian13":
            build_base_root(sysroot, versions, outdir)
        else:
            build_base(cache, kernel, versions, fetch_and_extract(cache, versions), outdir)
        shutil.rmtree(outdir, ignore_errors=True)
        os.replace(outdir + ".tmp", outdir)
    # checkout overlay
    checkout = os.path.abspath(checkout or os.path.dirname(os.path.dirname(HERE)))
    parts = []
    for rel in checkout_files(checkout):
        with open(os.path.join(checkout, rel), "rb") as fh:
            parts += [rel, oct(os.stat(os.path.join(checkout, rel)).st_mode & 0o777), fh.read()]
    deb = build_package(checkout)
    with open(deb, "rb") as fh:
        parts += [os.path.basename(deb), fh.read()]
    ckey = sha(parts)
    cpath = os.path.join(cache, "out", f"checkout-{ckey}.cpio.gz")
    if force or not os.path.exists(cpath):
        build_checkout_cpio(checkout, deb, cpath)
    # /init and helpers from tests/xen/dom0 (a layer of its own: editing them is cheap)
    hparts = []
    for f in sorted(glob.glob(os.path.join(HERE, "dom0", "*"))):
        with open(f, "rb") as fh:
            hparts += [os.path.basename(f), fh.read()]
    hkey = sha(hparts)
    hpath = os.path.join(cache, "out", f"dom0files-{hkey}.cpio.gz")
    if force or not os.path.exists(hpath):
        build_dom0_files_cpio(hpath)
    dpath = os.path.join(cache, "out", f"dom0-{bkey}-{hkey}-{ckey}.cpio.gz")
    if force or not os.path.exists(dpath):
        with open(dpath + ".tmp", "wb") as out:
            for p in (os.path.join(outdir, "base.cpio.gz"), hpath, cpath):
                with open(p, "rb") as fh:
                    shutil.copyfileobj(fh, out)
        os.replace(dpath + ".tmp", dpath)
    prune(os.path.join(cache, "out"), keep={outdir, cpath, hpath, dpath})
    res = {
        "xen": os.path.join(outdir, "xen.elf"),
        "kernel": os.path.join(outdir, "vmlinuz"),
        "initrd": dpath,
        "base_key": bkey,
        "checkout_key": ckey,
        "checkout": checkout,
        "has_block_rbd_script": os.path.exists(os.path.join(checkout, "scripts/block-rbd")),
        "package": deb,
        "base_cached": base_cached,
        "stack": stack,
        # where the stack's packages are unpacked (the guest's busybox and kernel come from
        # there too); None: fetch_and_extract() has them
        "sysroot": sysroot if stack == "debian13" else None,
        "packages": versions,
        "seconds": round(time.time() - t0, 2),
    }
    log(f"done in {res['seconds']}s (base {'cached' if base_cached else 'built'})")
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkout", help="checkout whose block_rbd + scripts/block-rbd go in")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--stack", choices=STACKS, default="debian12")
    a = ap.parse_args(argv)
    res = build(a.checkout, a.force, a.stack)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        for k in ("xen", "kernel", "initrd"):
            print(f"{k}: {res[k]}")


if __name__ == "__main__":
    main()
