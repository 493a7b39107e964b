"""Fixtures shared by the whole suite.

The cluster is real (tools/testcluster.py); the xenstore daemon is the
wire-protocol double (tests/xenstored.py) driven by Debian's real xenstore
tools, since this machine has no Xen.
"""

import contextlib
import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "block-rbd")
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from testcluster import TestCluster  # noqa: E402
from xenstored import XenstoredDouble  # noqa: E402

from block_rbd import attachments, mappers  # noqa: E402
from block_rbd import config as config_mod  # noqa: E402
from block_rbd.mappers.fuse import loop_devices, parse_mountinfo  # noqa: E402


def need(tool, package):
    """Skip, naming the missing component, when a tool is absent."""
    if not shutil.which(tool):
        pytest.skip("%s not installed (Debian package %s; .ci/run installs it)" % (tool, package))


# Inside a Xen dom0 (tests/xen runs this suite there): BLOCK_RBD_TEST_ENV=dom0 makes the
# `xenstored` fixture the REAL xenstored (same interface as the double) and `ceph_cluster`
# the external cluster named by BLOCK_RBD_TEST_CEPH_{CONF,ID,KEYRING} and _POOL.
# BLOCK_RBD_TEST_MAPPER picks the mapper of write_config() (default fuse).
IN_DOM0 = os.environ.get("BLOCK_RBD_TEST_ENV") == "dom0"
TEST_MAPPER = os.environ.get("BLOCK_RBD_TEST_MAPPER", "fuse")
# BLOCK_RBD_TEST_CLUSTER_SUITE=trixie: the test clusters run Debian 13's Ceph (18.2) from a
# root tools/debianroot.py builds, while the clients stay this system's.
CLUSTER_SUITE = os.environ.get("BLOCK_RBD_TEST_CLUSTER_SUITE") or None


def new_cluster(directory):
    """A TestCluster of the suite's Ceph (started by the caller)."""
    if CLUSTER_SUITE:
        need("debootstrap", "debootstrap")
    else:
        need("ceph-mon", "ceph-mon")
    return TestCluster(directory, suite=CLUSTER_SUITE)


class ExternalCluster:
    """The cluster the environment names (the test cluster on the Xen harness's host)."""

    def __init__(self, environ=os.environ):
        self.conf = environ.get("BLOCK_RBD_TEST_CEPH_CONF", "/etc/ceph/ceph.conf")
        self.user = environ.get("BLOCK_RBD_TEST_CEPH_ID", "blockrbd")
        self.user_keyring = environ.get("BLOCK_RBD_TEST_CEPH_KEYRING",
                                        "/etc/ceph/ceph.client.%s.keyring" % self.user)
        self.pool = environ.get("BLOCK_RBD_TEST_POOL", "rbd")
        self.mon_addrs = []


class RealXenstore:
    """The xenstored double's test interface over the real tools (dom0).  Whatever a test
    created under /local/domain (or at the top level) is removed afterwards."""

    _session_paths = None  # dom0's tree before the first test: cleanup restores to it

    def __init__(self):
        if RealXenstore._session_paths is None:
            RealXenstore._session_paths = self._paths()
        self.before = RealXenstore._session_paths

    @staticmethod
    def _tool(*argv):
        # Always the real daemon, whatever a test put in XENSTORED_PATH meanwhile.
        env = {k: v for k, v in os.environ.items() if not k.startswith("XENSTORED_")}
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=30, env=env)

    def env(self):
        return {}

    def read(self, path):
        result = self._tool("xenstore-read", "-R", path)
        return result.stdout if result.returncode == 0 else None

    def write(self, path, value):
        result = self._tool("xenstore-write", "-R", path, value)
        assert result.returncode == 0, result.stderr

    def rm(self, path):
        self._tool("xenstore-rm", path)

    def exists(self, path):
        return self._tool("xenstore-exists", path).returncode == 0

    def tree(self, prefix="/"):
        from xstools import parse_ls
        prefix = prefix if prefix.startswith("/") else "/local/domain/0/" + prefix
        result = self._tool("xenstore-ls", "-f", prefix)
        if result.returncode != 0:
            return {}
        found = {prefix.rstrip("/") + "/" + k: v for k, v in parse_ls(result.stdout, prefix).items()}
        value = self.read(prefix)
        if value is not None:
            found[prefix] = value
        return found

    def _paths(self):
        lines = self._tool("xenstore-ls", "-f", "/").stdout.splitlines()
        return set(line.split(" = ", 1)[0] for line in lines)

    def cleanup(self):
        """Remove what is new since the session began (one listing, one xenstore-rm)."""
        new = sorted(self._paths() - self.before)
        roots = [p for p in new if not any(p.startswith(q + "/") for q in new if q != p)]
        if roots:
            self._tool("xenstore-rm", *roots)


@pytest.fixture(scope="session")
def ceph_cluster():
    if IN_DOM0:
        yield ExternalCluster()
        return
    directory = tempfile.mkdtemp(prefix="brbd-ceph-")
    cluster = new_cluster(directory)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def rbd_admin(ceph_cluster):
    """(rados.Rados, ioctx of the test pool) as the least-privilege test user."""
    import rados
    handle = rados.Rados(conffile=ceph_cluster.conf, rados_id=ceph_cluster.user,
                         conf={"keyring": ceph_cluster.user_keyring})
    handle.connect()
    ioctx = handle.open_ioctx(ceph_cluster.pool)
    yield handle, ioctx
    ioctx.close()
    handle.shutdown()


@pytest.fixture
def make_image(rbd_admin):
    """Create a fresh image (default 64 MiB); removed after the test."""
    import rbd
    _handle, ioctx = rbd_admin
    made = []

    def make(name=None, size=64 << 20, features=None):
        name = name or "img-" + uuid.uuid4().hex[:10]
        kwargs = {"old_format": False}
        if features is not None:
            kwargs["features"] = features
        rbd.RBD().create(ioctx, name, size, **kwargs)
        made.append(name)
        return name

    yield make
    for name in made:
        remove_image(ioctx, name)


def remove_image(ioctx, name):
    """Remove an image, tolerating the ~30 s watcher linger of killed clients."""
    import rbd
    deadline = time.monotonic() + 60
    while True:
        try:
            with rbd.Image(ioctx, name) as image:
                for snap in image.list_snaps():
                    if image.is_protected_snap(snap["name"]):
                        image.unprotect_snap(snap["name"])
                    image.remove_snap(snap["name"])
            rbd.RBD().remove(ioctx, name)
            return
        except rbd.ImageNotFound:
            return
        except (rbd.ImageBusy, rbd.ImageHasSnapshots):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.fixture
def xenstored(tmp_path_factory, monkeypatch):
    """A xenstored double; the real xenstore-* tools reach it via XENSTORED_PATH."""
    if IN_DOM0:
        real = RealXenstore()
        yield real
        real.cleanup()
        return
    need("xenstore-read", "xenstore-utils")
    directory = tempfile.mkdtemp(prefix="xsd")  # short: Unix socket paths are limited
    with XenstoredDouble(os.path.join(directory, "sock")) as daemon:
        for key, value in daemon.env().items():
            monkeypatch.setenv(key, value)
        yield daemon
    shutil.rmtree(directory, ignore_errors=True)


def write_config(path, cluster, tmp, **overrides):
    """A block-rbd YAML config for the test cluster's least-privilege user."""
    data = {
        "ceph": {"conf": cluster.conf, "id": cluster.user, "keyring": cluster.user_keyring},
        "pool": cluster.pool,
        "mapper": TEST_MAPPER,
        "host": "testhost",
        "state_dir": os.path.join(tmp, "state"),
        "ledger_dir": os.path.join(tmp, "ledger"),
        "fuse": {"mount_dir": os.path.join(tmp, "fuse")},
        "log": {"file": os.path.join(tmp, "xen-hotplug.log"), "syslog": False},
        "timeouts": {"connect": 5, "op": 5, "map": 10, "unmap": 10},
    }
    for dotted, value in overrides.items():
        node = data
        keys = dotted.split(".")
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    with open(path, "w") as handle:
        yaml.safe_dump(data, handle)
    return str(path)


@pytest.fixture
def config_path(tmp_path, ceph_cluster, monkeypatch):
    path = write_config(tmp_path / "block-rbd.yaml", ceph_cluster, str(tmp_path))
    monkeypatch.setenv("BLOCK_RBD_CONFIG", path)
    return path


class Libxl:
    """Does what libxl does around a hotplug script: backend keys, env, exit code."""

    def __init__(self, xenstored):
        self.xs = xenstored
        self.next_devid = 51712

    def backend(self, params, mode="w", domid=5, devid=None, vm=None, name=None):
        """A vbd backend for domain `domid` (its VM uuid `vm`, its name `name`, e.g.
        NAME--incoming as `xl migrate-receive` calls the domain it restores)."""
        devid = devid or self.next_devid
        self.next_devid += 16
        path = "backend/vbd/%d/%d" % (domid, devid)
        full = "/local/domain/0/" + path
        for key, value in (("params", params), ("mode", mode), ("frontend-id", str(domid)),
                           ("dev", "xvdb"), ("type", "phy"), ("state", "2"),
                           ("frontend", "/local/domain/%d/device/vbd/%d" % (domid, devid))):
            self.xs.write("%s/%s" % (full, key), value)
        if self.xs.read("/local/domain/%d/vm" % domid) is None:
            self.xs.write("/local/domain/%d/vm" % domid, "/vm/" + (vm or str(uuid.uuid4())))
        if self.xs.read("/local/domain/%d/name" % domid) is None:
            self.xs.write("/local/domain/%d/name" % domid, name or "guest%d" % domid)
        return path

    def run(self, command, path, env=None, timeout=60):
        environ = dict(os.environ, XENBUS_PATH=path, XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend")
        environ.update(env or {})
        return subprocess.run([sys.executable, SCRIPT, command], env=environ, cwd="/",
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def keys(self, path):
        prefix = "/local/domain/0/%s/" % path
        return {k[len(prefix):]: v for k, v in self.xs.tree(prefix.rstrip("/")).items()
                if k.startswith(prefix)}


@pytest.fixture
def libxl(xenstored):
    return Libxl(xenstored)


def json_out(result):
    return json.loads(result.stdout)


def assert_refuses_writes(device):
    """A write to `device` fails as it does on a read-only disk."""
    with pytest.raises(OSError) as info:
        fd = os.open(device, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x" * 512, 0)
        finally:
            os.close(fd)
    assert info.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)


def fuse_dirs(root):
    """The fuse.mount_dir of write_config() below `root` (a glob): ROOT/fuse for a test,
    ROOT/HOST/fuse for a simulated host.  Globbing stops at those dirs and never looks
    inside a mount: one served by a frozen daemon would hang the lookup."""
    return glob.glob(os.path.join(root, "fuse")) + glob.glob(os.path.join(root, "*", "fuse"))


def fuse_daemons(point):
    """(pid, state) of the rbd-fuse processes serving the mount `point`."""
    found = []
    for proc in glob.glob("/proc/[0-9]*"):
        try:
            with open(proc + "/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
            if not argv[0].endswith(b"rbd-fuse") or point.encode() not in argv:
                continue
            with open(proc + "/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        found.append((int(proc[6:]), state))
    return found


def reap_fuse_mounts(mount_dir, only_stopped=False, kill_all=False):
    """Undo the rbd-fuse mounts directly below `mount_dir` (with only_stopped: those whose
    daemon is frozen or gone): kill their frozen daemons (all of them with kill_all),
    detach the loops on them, unmount them lazily.

    A test that froze (SIGSTOP) or killed a mapping client can leave a fuse mount nobody
    answers: any stat below it, pytest's own removal of old temp directories included,
    then hangs.  A killed daemon's /dev/fuse closes and the kernel aborts its connection:
    whatever waited on it fails instead, and the detach and unmount go through.  A live
    daemon exits by itself once unmounted, without the ~30 s watch linger of a killed one.
    """
    with open("/proc/self/mountinfo") as handle:
        points = parse_mountinfo(handle.read(), mount_dir)
    for point in points:
        daemons = fuse_daemons(point)
        if only_stopped and daemons and not any(state == "T" for _pid, state in daemons):
            continue
        doomed = [pid for pid, state in daemons if kill_all or state == "T"]
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(os.path.exists("/proc/%d" % pid) for pid in doomed) and time.monotonic() < deadline:
            time.sleep(0.05)
        for backing, loops in loop_devices().items():
            if backing.startswith(point + "/"):
                for name, _read_only in loops:
                    subprocess.run(["losetup", "--detach", "/dev/" + name], capture_output=True, timeout=10)
        subprocess.run(["umount", "-l", point], capture_output=True, timeout=10)


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_fuse_mounts(tmp_path_factory):
    # Before pytest removes old temp directories (at the first getbasetemp()): frozen
    # mounts there would hang it.  Like pytest, leave a directory whose .lock is younger
    # than three days: its session may still run, and may have frozen a daemon on purpose.
    for session in glob.glob("/tmp/pytest-of-%s/pytest-*" % os.environ.get("USER", "root")):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(os.path.join(session, ".lock")).st_mtime > time.time() - 3 * 86400:
                continue
        for mount_dir in fuse_dirs(os.path.join(session, "*")):
            reap_fuse_mounts(mount_dir, only_stopped=True)
    yield
    for mount_dir in fuse_dirs(os.path.join(str(tmp_path_factory.getbasetemp()), "*")):
        reap_fuse_mounts(mount_dir, kill_all=True)


@pytest.fixture(autouse=True)
def _restore_block_rbd_logger():
    """log.setup() (run by in-process CLI/hotplug calls) detaches the logger from
    pytest's capture; put it back so tests stay independent of their order."""
    import logging
    logger = logging.getLogger("block-rbd")
    saved = (list(logger.handlers), list(logger.filters), logger.propagate, logger.level)
    yield
    for handler in logger.handlers:
        if handler not in saved[0]:
            handler.close()
    logger.handlers[:], logger.filters[:] = saved[0], saved[1]
    logger.propagate, logger.level = saved[2], saved[3]


@pytest.fixture
def fuse_cleanup(tmp_path, make_image):
    """Whatever a failing test left under its own directory goes (loops first, then mounts),
    before make_image removes the images."""
    yield
    for mount_dir in fuse_dirs(str(tmp_path)):
        reap_fuse_mounts(mount_dir)


def leftovers(config_path, images=None):
    """What block-rbd still holds on this host for the config at `config_path`.

    mapped: devices the mapper under test still maps; mounts and loops: rbd-fuse mounts
    below the config's fuse dir and the loop devices on them, mapping or not (a run killed
    half-way leaves a mount without a loop); holders: "IMAGE: HOLDER" still recorded.
    `images` (image names) narrows mapped and holders: krbd and nbd mappings are host-wide.
    """
    config = config_mod.load(config_path)
    fuse_dir = config["fuse.mount_dir"]

    def wanted(spec):
        return images is None or spec.image in images

    with open("/proc/self/mountinfo") as handle:
        mounts = sorted(parse_mountinfo(handle.read(), fuse_dir))
    loops = sorted("/dev/" + name for backing, found in loop_devices().items()
                   if backing.startswith(fuse_dir + "/") for name, _read_only in found)
    mapped = sorted(m.device for m in mappers.get(TEST_MAPPER, config).mapped() if wanted(m.spec))
    state = attachments.local_state(config)
    holders = sorted("%s: %s" % (record.image, holder) for record in state.records()
                     if wanted(record.spec) for holder in record.holders)
    pending = sorted("%s: %s" % (item.image, item.holder) for item in state.pending() if wanted(item.spec))
    return {"mapped": mapped, "mounts": mounts, "loops": loops, "holders": holders, "pending": pending}


NOTHING = {"mapped": [], "mounts": [], "loops": [], "holders": [], "pending": []}


def pytest_terminal_summary(terminalreporter):
    """The fuzzers' seeds, case counts and times (tests/fuzz/fuzzkit.py), when they ran."""
    fuzzkit = sys.modules.get("fuzzkit")
    if fuzzkit is not None and fuzzkit.RUNS:
        terminalreporter.section("fuzzing (hypothesis, fixed seeds)")
        for run in fuzzkit.RUNS:
            terminalreporter.write_line(run.line())
