"""rbd-nbd at its exact interfaces (block_rbd/mappers/nbd.py).

Discovery reads what rbd-nbd's own list-mapped reads, here in a fake /sys and
/proc laid out as Linux shows them: /sys/block/nbdN links to
/sys/devices/virtual/block/nbdN, whose `ro` always exists and whose `pid`
exists only while the device is connected, holding the daemon's pid and a
newline (drivers/block/nbd.c, pid_show); /proc/PID/comm is the daemon's name
and a newline; /proc/PID/cmdline its argv, each argument ending in a NUL;
/proc/PID/status has "Uid:" and the real, effective, saved and fs uids, tab-separated;
/proc/PID/exe links to the executable's path, " (deleted)" appended once that file
was removed or replaced (a package upgrade).  A zombie keeps its comm and has an
empty cmdline.

`rbd device map -t nbd` spawns rbd-nbd as src/tools/rbd/action/Nbd.cc
(call_nbd_cmd, execute_map) does: argv[0] is the rbd binary's path with
"-nbd" appended, then the global options given to rbd, then "map", the spec
("pool/image[@snap]", the pool always named), then --read-only, --exclusive
and "--KEY=VALUE" for each -o option.
"""

import errno
import os
import re
import shutil
import threading
import time
import uuid

import pytest

from block_rbd import deadline, process
from block_rbd.config import from_dict
from block_rbd.errors import ClusterError, CommandError, HotplugTimeout, LockTimeout, MapperError
from block_rbd.mappers import nbd as nbd_mod
from block_rbd.mappers.nbd import NbdMapper, discover, option_args, option_value, orphans, spec_of_cmdline
from block_rbd.process import Result
from block_rbd.state import Holder, LocalState, MapRecord
from block_rbd.target import ImageSpec

NBDS_MAX = 16  # the nbd module's default number of devices
RBD_NBD = "/usr/bin/rbd-nbd"  # Debian's rbd-nbd: what /proc/PID/exe of its daemons links to
NOBODY = 65534


class Host:
    """/sys and /proc of a host with the nbd module loaded (nbd0..nbd15, none connected)."""

    def __init__(self, root):
        self.sys_root = str(root / "sys")
        self.proc_root = str(root / "proc")
        os.makedirs(os.path.join(self.sys_root, "block"))
        os.makedirs(os.path.join(self.sys_root, "module", "nbd"))
        os.makedirs(self.proc_root)
        for n in range(NBDS_MAX):
            real = os.path.join(self.sys_root, "devices", "virtual", "block", "nbd%d" % n)
            os.makedirs(real)
            self._write(os.path.join(real, "ro"), "0\n")
            os.symlink(os.path.join("..", "devices", "virtual", "block", "nbd%d" % n),
                       os.path.join(self.sys_root, "block", "nbd%d" % n))
        self._next_pid = 41235

    @staticmethod
    def _write(path, text, mode="w"):
        with open(path, mode) as handle:
            handle.write(text)

    def _dev(self, device):
        return os.path.join(self.sys_root, "block", os.path.basename(device))

    def spawn(self, argv, comm="rbd-nbd", uid=0, exe=RBD_NBD):
        """A process with this argv, run by `uid` from `exe` (None: no exe link); its pid."""
        pid = self._next_pid
        self._next_pid += 66
        os.makedirs(os.path.join(self.proc_root, str(pid)))
        self._write(os.path.join(self.proc_root, str(pid), "comm"), comm + "\n")
        self._write(os.path.join(self.proc_root, str(pid), "cmdline"),
                    b"".join(a.encode() + b"\0" for a in argv), "wb")
        self._write(os.path.join(self.proc_root, str(pid), "status"),
                    "Name:\t%s\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t%d\nPid:\t%d\nPPid:\t1\n"
                    "Uid:\t%d\t%d\t%d\t%d\nGid:\t%d\t%d\t%d\t%d\n"
                    % ((comm[:15], pid, pid) + (uid,) * 8))
        if exe is not None:
            os.symlink(exe, os.path.join(self.proc_root, str(pid), "exe"))  # dangling here: only read
        return pid

    def connect(self, device, pid, read_only=False, backend=None):
        """The kernel's view once the daemon `pid` has set the device up; `backend`: set up
        through netlink with that identifier (the `backend` file exists only then)."""
        self._write(os.path.join(self._dev(device), "pid"), "%d\n" % pid)
        self._write(os.path.join(self._dev(device), "ro"), "1\n" if read_only else "0\n")
        self.resize(device, 32 << 20)
        if backend:
            self._write(os.path.join(self._dev(device), "backend"), backend + "\n")

    def daemon(self, device, argv, read_only=False, comm="rbd-nbd", backend=None, uid=0, exe=RBD_NBD):
        pid = self.spawn(argv, comm, uid, exe)
        self.connect(device, pid, read_only, backend)
        return pid

    def resize(self, device, size):
        self._write(os.path.join(self._dev(device), "size"), "%d\n" % (size // 512))

    def backend(self, device):
        path = os.path.join(self._dev(device), "backend")
        return open(path).read().strip() if os.path.exists(path) else None

    def disconnect(self, device):
        """What the kernel does on a disconnect, and the daemon's exit (if it still runs)."""
        pid_file = os.path.join(self._dev(device), "pid")
        with open(pid_file) as handle:
            pid = int(handle.read())
        os.unlink(pid_file)
        self._write(os.path.join(self._dev(device), "ro"), "0\n")
        if os.path.exists(os.path.join(self._dev(device), "backend")):
            os.unlink(os.path.join(self._dev(device), "backend"))
        if os.path.exists(os.path.join(self.proc_root, str(pid))):
            self.exit(pid)

    def exit(self, pid):
        shutil.rmtree(os.path.join(self.proc_root, str(pid)))

    def zombie(self, pid):
        self._write(os.path.join(self.proc_root, str(pid), "cmdline"), "")
        if os.path.lexists(os.path.join(self.proc_root, str(pid), "exe")):
            os.unlink(os.path.join(self.proc_root, str(pid), "exe"))  # readlink: ENOENT

    def connected(self):
        return sorted(n for n in os.listdir(os.path.join(self.sys_root, "block"))
                      if os.path.exists(os.path.join(self.sys_root, "block", n, "pid")))

    def free_device(self):
        for n in range(NBDS_MAX):
            if not os.path.exists(os.path.join(self.sys_root, "block", "nbd%d" % n, "pid")):
                return "/dev/nbd%d" % n
        raise AssertionError("no free nbd device")


@pytest.fixture
def host(tmp_path):
    return Host(tmp_path)


@pytest.fixture(autouse=True)
def slots(tmp_path, monkeypatch):
    """The map slots in a private state dir, not the host's /run/block-rbd."""
    made = []

    def local_state(config):
        made.append(LocalState(str(tmp_path / "state"), config["timeouts.lock"]))
        return made[-1]
    monkeypatch.setattr(nbd_mod, "local_state", local_state)
    return LocalState(str(tmp_path / "state"), 0.3)


@pytest.fixture
def config():
    return from_dict({"ceph": {"conf": "/etc/ceph/c.conf", "id": "dom0a", "keyring": "/etc/ceph/dom0a.keyring"},
                      "timeouts": {"map": 20, "unmap": 10, "op": 5}})


@pytest.fixture
def mapper(config, host):
    return NbdMapper(config, sys_root=host.sys_root, proc_root=host.proc_root)


COOKIE = "9f3c2a1e-6b1d-4c51-8a43-0d6f1e2b7c90"


def ours(config, spec, read_only=False, options=(), cookie=COOKIE):
    """The argv block-rbd starts rbd-nbd with: what its daemon's /proc/PID/cmdline holds."""
    return NbdMapper(config).map_argv(spec, read_only, options, cookie)


class RbdNbd:
    """A recording stand-in for block_rbd.process.run when the command is rbd-nbd.

    `map` connects the first free device (or --device's) in the fake /sys and
    starts a daemon with the map's argv in the fake /proc, as the real tool
    does before it prints the device.  block-rbd's unmap starts no rbd-nbd (the `kernel` fixture).
    """

    def __init__(self, host):
        self.host = host
        self.calls = []
        self.scopes = []  # the process.Scope of each call: every daemon gets one
        self.map_result = None  # None: succeed and print the device it connected
        self.netlink = True     # False: the kernel has no nbd netlink (rbd-nbd falls back to ioctl)

    def __call__(self, argv, *, timeout=None, check=True, input=None, env=None, quiet=False, scope=None):
        assert input is None and env is None
        argv = [str(a) for a in argv]
        self.calls.append(argv)
        self.scopes.append(scope)
        if argv[:2] == ["rbd-nbd", "map"]:
            return self._map(argv, check)
        if argv[:2] == ["rbd-nbd", "attach"]:
            return self._attach(argv)
        raise AssertionError("unexpected command %r" % argv)

    def _attach(self, argv):
        """NBD_CMD_RECONFIGURE with a new daemon's socket: only for a netlink device whose
        identifier is the cookie given; the kernel keeps the first daemon's pid in `pid`."""
        device, cookie = option_value(argv, "--device"), option_value(argv, "--cookie")
        if not os.path.exists(os.path.join(self.host._dev(device), "pid")) or self.host.backend(device) != cookie:
            raise CommandError("rbd-nbd attach failed: rbd-nbd: failed to reconfigure: (22) Invalid argument",
                               returncode=1, stderr="rbd-nbd: failed to reconfigure: (22) Invalid argument\n")
        self.host.spawn(argv)
        return Result(argv, 0, "", "")

    def _map(self, argv, check):
        device = argv[argv.index("--device") + 1] if "--device" in argv else self.host.free_device()
        result = self.map_result or Result(argv, 0, device + "\n", "")
        if result.returncode:
            if check:
                raise CommandError("rbd-nbd map failed: " + process.last_line(result.stderr),
                                   returncode=result.returncode, stderr=result.stderr)
            return result
        printed = result.stdout.strip().splitlines()
        if printed and printed[-1].startswith("/dev/nbd"):
            netlink = self.netlink and "--try-netlink" in argv
            self.host.daemon(printed[-1], argv, read_only="--read-only" in argv,
                             backend=option_value(argv, "--cookie") if netlink else None)
        return result


@pytest.fixture
def rbd_nbd(mocker, host):
    fake = RbdNbd(host)
    mocker.patch.object(process, "run", side_effect=fake)
    yield fake
    # Discovery reads sysfs and /proc: the slow C++ list-mapped is never started.
    assert not any(argv[:2] == ["rbd-nbd", "list-mapped"] for argv in fake.calls)


# ---- discovery: /sys/block/nbd*/pid and the daemon's /proc entries --------------------------------

def test_nothing_connected(host, mapper):
    assert discover(host.sys_root, host.proc_root) == []
    assert mapper.mapped() == []


def test_no_nbd_devices_at_all(tmp_path):
    assert discover(str(tmp_path / "sys"), str(tmp_path / "proc")) == []


def test_one_mapping_of_block_rbd(host, mapper, config):
    pid = host.daemon("/dev/nbd0", ours(config, ImageSpec("rbd", "vm1")))
    (mapping,) = mapper.mapped()
    assert mapping.mapper == "nbd"
    assert mapping.spec == ImageSpec("rbd", "vm1")
    assert mapping.device == "/dev/nbd0" and mapping.read_only is False
    assert mapping.details == {"pid": pid, "cookie": None}  # set up by ioctl: no backend identifier


def test_several_with_namespace_snapshot_and_read_only(host, mapper, config):
    host.daemon("/dev/nbd0", ours(config, ImageSpec("rbd", "vm1")))
    host.daemon("/dev/nbd1", ours(config, ImageSpec("rbd", "vm1", "tenant", "gold"), True, ("exclusive",)),
                read_only=True)
    host.daemon("/dev/nbd15", ours(config, ImageSpec("tank", "db"), False, ("io_timeout=30",)))
    host.daemon("/dev/nbd2", ours(config, ImageSpec("rbd", "vm1"), True), read_only=True)
    assert [(str(m.spec), m.device, m.read_only) for m in mapper.mapped()] == [
        ("rbd/vm1", "/dev/nbd0", False),
        ("rbd/tenant/vm1@gold", "/dev/nbd1", True),
        ("rbd/vm1", "/dev/nbd2", True),   # devices in number order: nbd2 before nbd15
        ("tank/db", "/dev/nbd15", False),
    ]


def test_read_only_comes_from_the_device(host, mapper):
    # what the kernel says, not what the command line asked for
    host.daemon("/dev/nbd4", ["rbd-nbd", "map", "rbd/vm1"], read_only=True)
    (mapping,) = mapper.mapped()
    assert mapping.device == "/dev/nbd4" and mapping.read_only is True


def test_a_daemon_that_is_not_rbd_nbd_is_ignored(host, mapper, config):
    host.daemon("/dev/nbd0", ["qemu-nbd", "--connect=/dev/nbd0", "/var/lib/disk.qcow2"], comm="qemu-nbd")
    # even one whose command line looks like a map
    host.daemon("/dev/nbd1", ours(config, ImageSpec("rbd", "vm1")), comm="nbd-client")
    host.daemon("/dev/nbd2", ours(config, ImageSpec("rbd", "vm2")))
    assert [(m.device, str(m.spec)) for m in mapper.mapped()] == [("/dev/nbd2", "rbd/vm2")]


def test_a_pid_whose_process_is_gone_is_ignored(host, mapper, config):
    gone = host.daemon("/dev/nbd0", ours(config, ImageSpec("rbd", "vm1")))
    host.exit(gone)  # the daemon died; the kernel still holds the device (reattach timeout)
    dead = host.daemon("/dev/nbd1", ours(config, ImageSpec("rbd", "vm2")))
    host.zombie(dead)  # exited, not yet reaped: empty cmdline
    host.daemon("/dev/nbd2", ours(config, ImageSpec("rbd", "vm3")))
    assert host.connected() == ["nbd0", "nbd1", "nbd2"]
    assert [m.device for m in mapper.mapped()] == ["/dev/nbd2"]


@pytest.mark.parametrize("argv", [
    ["rbd-nbd", "list-mapped", "--format", "json"],
    ["rbd-nbd", "unmap", "/dev/nbd0"],
    ["rbd-nbd", "detach", "rbd/vm1"],
    ["rbd-nbd", "--help"],
    ["rbd-nbd"],
])
def test_an_argv_that_is_not_a_map_is_ignored(host, mapper, argv):
    host.daemon("/dev/nbd0", argv)  # a reused pid, or a tool caught mid-run
    assert mapper.mapped() == []
    assert spec_of_cmdline(argv) is None


def test_rbd_device_map_t_nbd(host, mapper):
    """`rbd --id admin device map -t nbd rbd/vm1@gold`: global options first, the spec after map."""
    host.daemon("/dev/nbd3", ["/usr/bin/rbd-nbd", "--id", "admin", "map", "rbd/vm1@gold"])
    (mapping,) = mapper.mapped()
    assert (mapping.spec, mapping.device) == (ImageSpec("rbd", "vm1", "", "gold"), "/dev/nbd3")


def test_rbd_device_map_t_nbd_with_options(host, mapper):
    """`rbd device map -t nbd --read-only --exclusive -o io_timeout=30 rbd/vm1`: the options follow the spec."""
    host.daemon("/dev/nbd3", ["/usr/bin/rbd-nbd", "map", "rbd/vm1", "--read-only", "--exclusive",
                              "--io_timeout=30"], read_only=True)
    (mapping,) = mapper.mapped()
    assert (mapping.spec, mapping.device, mapping.read_only) == (ImageSpec("rbd", "vm1"), "/dev/nbd3", True)


def test_an_option_value_after_the_spec_is_not_taken_for_the_image(host, mapper):
    """`rbd-nbd map rbd/vm1 --io-timeout 30` serves rbd/vm1, never an image called "30"."""
    host.daemon("/dev/nbd3", ["rbd-nbd", "map", "rbd/vm1", "--io-timeout", "30"])
    assert [str(m.spec) for m in mapper.mapped()] == ["rbd/vm1"]
    assert mapper.find(ImageSpec("rbd", "30"), False) is None


@pytest.mark.parametrize("argv, spec", [
    (["rbd-nbd", "map", "vm1"], ImageSpec("rbd", "vm1")),  # rbd-nbd's default pool
    (["rbd-nbd", "map", "vm1@s1"], ImageSpec("rbd", "vm1", "", "s1")),
    (["rbd-nbd", "map", "-c", "/etc/ceph/c.conf", "--id", "dom0a", "--keyring", "/k", "--read-only",
      "--try-netlink", "--io-timeout", "30", "--exclusive", "rbd/tenant/vm1@gold"],
     ImageSpec("rbd", "vm1", "tenant", "gold")),
    (["rbd-nbd", "attach", "--device", "/dev/nbd0", "tank/db"], ImageSpec("tank", "db")),
    (["/usr/bin/rbd-nbd", "map", "pool/ns/img"], ImageSpec("pool", "img", "ns")),
])
def test_spec_of_cmdline(argv, spec):
    assert spec_of_cmdline(argv) == spec
    assert spec_of_cmdline(argv + [""]) == spec  # cmdline's final NUL


def test_a_spec_that_is_not_a_valid_spec_is_ignored(host, mapper):
    host.daemon("/dev/nbd0", ["rbd-nbd", "map", "a/b/c/d"])
    assert mapper.mapped() == []


# ---- map ------------------------------------------------------------------------------------

def test_map_argv_exactly(mapper, rbd_nbd, host):
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    cookie = mapping.details["cookie"]
    assert rbd_nbd.calls == [
        ["rbd-nbd", "map", "rbd/vm1", "-c", "/etc/ceph/c.conf", "--id", "dom0a", "--keyring",
         "/etc/ceph/dom0a.keyring", "--try-netlink", "--cookie", cookie, "--reattach-timeout", "30",
         "--device", "/dev/nbd0"],
    ]
    assert cookie.startswith("brbd-") and str(uuid.UUID(cookie[5:])) == cookie[5:]  # a fresh one per map
    assert mapping.device == "/dev/nbd0" and mapping.mapper == "nbd" and not mapping.read_only
    assert mapping.details == {"cookie": cookie, "options": []}
    assert host.connected() == ["nbd0"] and host.backend("/dev/nbd0") == cookie


def test_map_read_only_namespace_snapshot_and_options(host, rbd_nbd):
    config = from_dict({"ceph": {"conf": "/c", "id": "dom0a", "keyring": "/k"},
                        "nbd": {"options": ["try_netlink", "io_timeout=30"]}})
    mapping = NbdMapper(config, sys_root=host.sys_root, proc_root=host.proc_root).map(
        ImageSpec("rbd", "vm1", "tenant", "gold"), True, ("exclusive",))
    assert rbd_nbd.calls[-1] == [
        "rbd-nbd", "map", "rbd/tenant/vm1@gold", "-c", "/c", "--id", "dom0a", "--keyring", "/k", "--try-netlink",
        "--cookie", mapping.details["cookie"], "--reattach-timeout", "30", "--read-only",
        "--try-netlink", "--io-timeout", "30", "--exclusive", "--device", "/dev/nbd0"]
    assert mapping.details["options"] == ["exclusive"]


def test_what_map_starts_is_found_by_discovery(host, config, rbd_nbd):
    """Every argv block-rbd starts rbd-nbd with is recognised from the daemon's /proc entries,
    map options unknown to the parser included (the spec comes before them)."""
    config = from_dict({"ceph": {"conf": "/c", "id": "dom0a", "keyring": "/k"},
                        "nbd": {"options": ["try_netlink", "io_timeout=30", "some_new_option=7"]}})
    mapper = NbdMapper(config, sys_root=host.sys_root, proc_root=host.proc_root)
    specs = [(ImageSpec("rbd", "vm1"), False, ()), (ImageSpec("rbd", "vm1"), True, ()),
             (ImageSpec("rbd", "vm1", "tenant", "gold"), True, ("exclusive",)),
             (ImageSpec("tank", "db"), False, ("device=/dev/nbd9",)),
             (ImageSpec("tank", "qos"), False, ("rbd_qos_iops_limit=50", "rbd_qos_bps_limit=1048576"))]
    mapped = [mapper.map(spec, ro, options) for spec, ro, options in specs]
    assert [m.device for m in mapped] == ["/dev/nbd0", "/dev/nbd1", "/dev/nbd2", "/dev/nbd9", "/dev/nbd3"]
    assert sorted((m.device, m.spec, m.read_only) for m in mapper.mapped()) == sorted(
        (m.device, spec, ro) for (spec, ro, _o), m in zip(specs, mapped))
    for (spec, ro, _o), m in zip(specs, mapped):
        assert mapper.find(spec, ro).device == m.device
    assert len(rbd_nbd.calls) == 5


def test_a_map_names_a_free_device_no_other_map_has_claimed(mapper, rbd_nbd, host, config, slots):
    """Concurrent netlink connects without --device all race for the first free device
    (all but one refused, "Device being setup by another task"): each map claims one."""
    host.daemon("/dev/nbd0", ours(config, ImageSpec("rbd", "other")))  # connected: not free
    with slots.claim("nbd-device.nbd1") as mine:                          # a map in flight
        assert mine
        mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    assert rbd_nbd.calls[-1][-2:] == ["--device", "/dev/nbd2"] and mapping.device == "/dev/nbd2"
    assert mapper.map(ImageSpec("rbd", "vm2"), False).device == "/dev/nbd1"  # released with its map
    # device= among the map options is the operator's choice
    mapper.map(ImageSpec("rbd", "vm3"), False, ("device=/dev/nbd9",))
    assert rbd_nbd.calls[-1].count("--device") == 1 and rbd_nbd.calls[-1][-2:] == ["--device", "/dev/nbd9"]


def test_map_reuses_an_existing_mapping(mapper, rbd_nbd, host, config):
    host.daemon("/dev/nbd1", ours(config, ImageSpec("rbd", "vm1", "tenant", "gold"), True), read_only=True)
    mapping = mapper.map(ImageSpec("rbd", "vm1", "tenant", "gold"), True)
    assert mapping.device == "/dev/nbd1"
    assert rbd_nbd.calls == []  # found by reading sysfs and /proc: no command at all
    # the same image in the other mode is a new mapping
    other = mapper.map(ImageSpec("rbd", "vm1", "tenant", "gold"), False)
    assert rbd_nbd.calls[-1][:2] == ["rbd-nbd", "map"]
    assert other.device == "/dev/nbd0" and not other.read_only
    # and mapping either again runs nothing more
    assert mapper.map(ImageSpec("rbd", "vm1", "tenant", "gold"), False).device == "/dev/nbd0"
    assert len(rbd_nbd.calls) == 1


def test_map_takes_the_last_line_of_stdout(mapper, rbd_nbd):
    rbd_nbd.map_result = Result([], 0, "some notice\n/dev/nbd7\n", "")
    assert mapper.map(ImageSpec("rbd", "vm1"), False).device == "/dev/nbd7"
    assert [m.device for m in mapper.mapped()] == ["/dev/nbd7"]


@pytest.mark.parametrize("stdout", ["", "\n", "done\n"])
def test_map_that_prints_no_device(mapper, rbd_nbd, stdout):
    rbd_nbd.map_result = Result([], 0, stdout, "")
    with pytest.raises(MapperError, match="^rbd-nbd map of rbd/vm1 printed no device$"):
        mapper.map(ImageSpec("rbd", "vm1"), False)


@pytest.mark.parametrize("stderr, cause", [
    ("2023-01-01T00:00:00.000+0000 7f 0 set uid:gid\nrbd-nbd: failed to find unused device\n",
     "rbd-nbd: failed to find unused device"),
    ("rbd-nbd: failed to open image: (2) No such file or directory\n",
     "rbd-nbd: failed to open image: (2) No such file or directory"),
])
def test_map_failure_is_one_line_with_the_tools_cause(mapper, rbd_nbd, host, stderr, cause):
    rbd_nbd.map_result = Result([], 1, "", stderr)
    with pytest.raises(MapperError) as info:
        mapper.map(ImageSpec("rbd", "vm1"), False)
    assert str(info.value) == "rbd-nbd map of rbd/vm1 failed: %s" % cause
    assert host.connected() == []


def test_no_secret_in_argv(mapper, rbd_nbd):
    mapper.map(ImageSpec("rbd", "vm1"), True, ("exclusive",))
    argv = rbd_nbd.calls[-1]
    assert "--key" not in argv and not any(a.startswith(("--key=", "--secret")) for a in argv)
    assert argv[argv.index("--keyring") + 1] == "/etc/ceph/dom0a.keyring"


# ---- unmap ----------------------------------------------------------------------------------

@pytest.fixture
def kernel(host, monkeypatch):
    """NBD_DISCONNECT as the kernel and the device's daemon answer it: the device is let go
    and the daemon exits, at once or (exits_after) later, or never (exits_after=None)."""
    class Kernel:
        calls = []
        via = []  # "ioctl" (NBD_DISCONNECT) or "netlink" (NBD_CMD_DISCONNECT), per call
        exits_after = 0.0
        error = None

    def disconnect(device, via="ioctl"):
        Kernel.calls.append(device)
        Kernel.via.append(via)
        if Kernel.error:
            raise Kernel.error
        dev = os.path.join(host.sys_root, "block", os.path.basename(device))
        with open(os.path.join(dev, "pid")) as handle:
            pid = int(handle.read())
        os.unlink(os.path.join(dev, "pid"))
        if os.path.exists(os.path.join(dev, "backend")):
            os.unlink(os.path.join(dev, "backend"))
        # the daemon serving it: the pid file's, or (after a reattach) the one with the cookie
        served = [p for p, argv in nbd_mod.daemons(host.proc_root) if p == pid or (
            option_value(argv, "--device") == device)]
        for p in served:
            if Kernel.exits_after == 0:
                host.exit(p)
            elif Kernel.exits_after is not None:
                threading.Timer(Kernel.exits_after, host.zombie, (p,)).start()
    monkeypatch.setattr(nbd_mod, "disconnect", disconnect)
    monkeypatch.setattr(nbd_mod, "disconnect_netlink", lambda device: disconnect(device, "netlink"))
    return Kernel


def test_unmap_disconnects_the_device_and_starts_nothing(mapper, rbd_nbd, host, kernel):
    mapper.map(ImageSpec("rbd", "vm1"), False)
    (mapping,) = mapper.mapped()
    mapper.unmap(mapping)
    assert kernel.calls == ["/dev/nbd0"] and kernel.via == ["netlink"]  # a netlink device
    assert rbd_nbd.calls == [rbd_nbd.calls[0]]  # the map; the unmap started no rbd-nbd
    assert host.connected() == [] and mapper.mapped() == []


def test_a_device_set_up_by_ioctl_is_disconnected_by_ioctl(mapper, rbd_nbd, host, kernel):
    rbd_nbd.netlink = False  # a kernel without nbd netlink: rbd-nbd fell back to the ioctls
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    assert mapping.details == {"cookie": None, "options": []} and host.backend("/dev/nbd0") is None
    mapper.unmap(mapper.find(ImageSpec("rbd", "vm1"), False))
    assert kernel.via == ["ioctl"] and host.connected() == []


def test_unmap_waits_for_the_daemon_to_exit(mapper, rbd_nbd, host, kernel):
    """The daemon flushes and closes its image after the disconnect: unmap returns once it
    has exited (here: a zombie), not while it may still hold the image's watch."""
    mapper.map(ImageSpec("rbd", "vm1"), False)
    (mapping,) = mapper.mapped()
    kernel.exits_after = 0.4
    started = time.monotonic()
    mapper.unmap(mapping)
    assert 0.35 < time.monotonic() - started < 3


def test_a_daemon_that_does_not_exit_fails_the_unmap_within_the_budget(mapper, rbd_nbd, host, kernel):
    mapper.map(ImageSpec("rbd", "vm1"), False)
    (mapping,) = mapper.mapped()
    kernel.exits_after = None
    started = time.monotonic()
    with deadline.budget(deadline.Deadline(0.5)):
        with pytest.raises(MapperError, match=r"^the rbd-nbd daemon of /dev/nbd0 \(pid \d+\) was still running "
                                              r"\d+ s after the disconnect$"):
            mapper.unmap(mapping)
    assert time.monotonic() - started < 2


def test_unmap_of_a_device_already_gone_does_nothing(mapper, rbd_nbd, host, config, kernel):
    host.daemon("/dev/nbd0", ours(config, ImageSpec("rbd", "vm1")))
    (mapping,) = mapper.mapped()
    host.disconnect("/dev/nbd0")
    mapper.unmap(mapping)
    assert rbd_nbd.calls == [] and kernel.calls == []


def test_unmap_failure(mapper, rbd_nbd, host, config, kernel):
    host.daemon("/dev/nbd0", ours(config, ImageSpec("rbd", "vm1")))
    (mapping,) = mapper.mapped()
    kernel.error = OSError(errno.EINVAL, "Invalid argument")
    with pytest.raises(MapperError, match="^disconnecting /dev/nbd0 failed: Invalid argument$"):
        mapper.unmap(mapping)
    assert host.connected() == ["nbd0"]


def test_disconnect_is_the_nbd_ioctl(tmp_path, mocker):
    """NBD_DISCONNECT on the device opened read-write, closed after."""
    dev = tmp_path / "nbd3"
    dev.write_bytes(b"")
    ioctl = mocker.patch.object(nbd_mod.fcntl, "ioctl")
    nbd_mod.disconnect(str(dev))
    (fd, request), _kw = ioctl.call_args
    assert request == 0xAB08
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


# ---- options and availability ---------------------------------------------------------------------

@pytest.mark.parametrize("options, args", [
    ((), []),
    (("exclusive",), ["--exclusive"]),
    (("try_netlink", "io_timeout=30"), ["--try-netlink", "--io-timeout", "30"]),
    (("device=/dev/nbd5",), ["--device", "/dev/nbd5"]),
    # librbd's options (qos=) are Ceph config overrides, one word each
    (("rbd_qos_iops_limit=500", "notrim"), ["--rbd_qos_iops_limit=500", "--notrim"]),
    # krbd's ms_mode: librbd's messenger modes for the monitors and the OSDs
    (("ms_mode=secure",), ["--ms_mon_client_mode=secure", "--ms_client_mode=secure"]),
    (("ms_mode=prefer-crc",), ["--ms_mon_client_mode=crc secure", "--ms_client_mode=crc secure"]),
])
def test_option_args(options, args):
    assert option_args(options) == args


def test_an_ms_mode_rbd_nbd_lacks_is_refused_in_one_line():
    with pytest.raises(MapperError, match="^ms_mode=legacy is not a mode rbd-nbd has "
                       "\\(crc, secure, prefer-crc, prefer-secure\\)$"):
        option_args(("ms_mode=legacy",))


def test_unavailable_without_rbd_nbd(mapper, mocker):
    mocker.patch.object(nbd_mod.shutil, "which", return_value=None)
    assert mapper.unavailable() == "rbd-nbd is not installed (apt-get install rbd-nbd)"


def test_unavailable_without_the_nbd_driver(config, tmp_path, mocker):
    mocker.patch.object(nbd_mod.shutil, "which", return_value="/usr/bin/rbd-nbd")
    run = mocker.patch.object(process, "run", side_effect=CommandError(
        "modprobe nbd failed: modprobe: FATAL: Module nbd not found"))
    assert NbdMapper(config, sys_root=str(tmp_path)).unavailable() == (
        "no nbd driver in this kernel (modprobe nbd failed: modprobe: FATAL: Module nbd not found)")
    assert run.call_args.args[0] == ["modprobe", "nbd"]


def test_available_with_the_module_loaded(mapper, mocker):
    mocker.patch.object(nbd_mod.shutil, "which", return_value="/usr/bin/rbd-nbd")
    run = mocker.patch.object(process, "run")
    assert mapper.unavailable() is None
    run.assert_not_called()


def test_real_rbd_nbd_on_this_kernel_fails_cleanly(config, tmp_path):
    """This machine has no nbd driver: the real tool's failure becomes one MapperError line."""
    if not os.path.exists("/usr/bin/rbd-nbd"):
        pytest.skip("rbd-nbd not installed (Debian package rbd-nbd)")
    if os.path.isdir("/sys/module/nbd"):
        pytest.skip("this kernel has nbd: the real run belongs to the Xen-in-QEMU tests")
    cfg = from_dict({"ceph": {"conf": str(tmp_path / "none.conf"), "id": "dom0a", "keyring": str(tmp_path / "k")},
                     "timeouts": {"map": 10}})
    with pytest.raises(MapperError) as info:
        NbdMapper(cfg)._map(ImageSpec("rbd", "vm1"), False, ())
    assert str(info.value).startswith("rbd-nbd map of rbd/vm1 failed: ")
    assert "\n" not in str(info.value)


def test_map_waits_for_a_free_slot_and_fails_cleanly_without_one(mapper, rbd_nbd, slots, monkeypatch):
    """Only MAP_SLOTS `rbd-nbd map`s start at once on the host; with every slot held past
    the wait, the map fails with one line and nothing was started."""
    monkeypatch.setattr(nbd_mod, "MAP_SLOTS", 1)
    with slots.slot("nbd-map", 1):
        with deadline.budget(deadline.Deadline(0.3)):
            with pytest.raises((LockTimeout, HotplugTimeout), match="nbd-map"):
                mapper.map(ImageSpec("rbd", "vm1"), False)
    assert rbd_nbd.calls == []
    assert mapper.map(ImageSpec("rbd", "vm1"), False).device == "/dev/nbd0"


# ---- a map that was given up ------------------------------------------------------------------

@pytest.fixture
def signals(host, monkeypatch):
    """SIGTERM to a fake daemon: it exits (its device goes with it if set up by ioctl; one set
    up by netlink stays, waiting for a new daemon), unless stubborn."""
    class Signals:
        sent = []
        stubborn = set()

    def terminate(pid):
        Signals.sent.append(pid)
        if pid in Signals.stubborn:
            return
        for name in host.connected():
            with open(os.path.join(host.sys_root, "block", name, "pid")) as handle:
                if int(handle.read()) == pid and host.backend(name) is None:
                    os.unlink(os.path.join(host.sys_root, "block", name, "pid"))  # netlink devices stay
        host.exit(pid)
    monkeypatch.setattr(nbd_mod, "terminate", terminate)
    return Signals


def test_a_given_up_map_leaves_no_daemon_to_connect_later(mapper, host, config, signals, kernel):
    """`rbd-nbd map` killed when the time ran out: its forked daemon is still starting and
    would connect a device after the add failed.  The undo stops it, and only it."""
    late = host.spawn(ours(config, ImageSpec("rbd", "vm1")))           # not connected yet
    other_mode = host.spawn(ours(config, ImageSpec("rbd", "vm1"), True))
    other_image = host.spawn(ours(config, ImageSpec("rbd", "vm2")))
    serving = host.daemon("/dev/nbd0", ours(config, ImageSpec("rbd", "vm3")))
    mapper.discard_partial(ImageSpec("rbd", "vm1"), False)
    assert signals.sent == [late]
    assert [pid for pid, _argv in nbd_mod.daemons(host.proc_root)] == sorted([other_mode, other_image, serving])
    assert kernel.calls == []


def test_a_given_up_map_that_connected_meanwhile_is_unmapped(mapper, host, config, signals, kernel):
    host.daemon("/dev/nbd4", ours(config, ImageSpec("rbd", "vm1")))
    mapper.discard_partial(ImageSpec("rbd", "vm1"), False)
    assert kernel.calls == ["/dev/nbd4"] and host.connected() == []


def test_a_daemon_that_ignores_sigterm_fails_the_undo_in_one_line(mapper, host, config, signals):
    late = host.spawn(ours(config, ImageSpec("rbd", "vm1")))
    signals.stubborn.add(late)
    with deadline.budget(deadline.Deadline(0.4)):
        with pytest.raises(MapperError, match=r"^rbd-nbd %d \(a map of rbd/vm1 that was given up\) was still "
                                              r"running \d+ s after SIGTERM$" % late):
            mapper.discard_partial(ImageSpec("rbd", "vm1"), False)


def test_nothing_to_discard(mapper, host, signals, kernel):
    host.spawn(["rbd-nbd", "list-mapped"])
    mapper.discard_partial(ImageSpec("rbd", "vm1"), False)
    assert signals.sent == [] and kernel.calls == []


# ---- devices that outlive their daemon: reattach, heal, restart ---------------------------------

def record_of(state, mapping, holder="backend/vbd/5/51712"):
    """block-rbd's record of a mapping, as attach saves it."""
    record = MapRecord(str(mapping.spec), mapping.read_only)
    record.hold(holder, Holder("w", 1))
    record.mapped_by(mapping)
    state.save(record)
    return record


@pytest.fixture
def logged(caplog):
    caplog.set_level("INFO", logger="block-rbd")
    return caplog


def test_a_reattached_device_is_found_by_its_daemon_not_by_its_pid_file(mapper, rbd_nbd, host, config):
    """After `rbd-nbd attach`, /sys/block/nbdN/pid still names the first daemon (the kernel
    sets it only at connect); the serving one is the attach with --device, the same cookie."""
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False, ("rbd_qos_iops_limit=50",))
    first = mapper.serving("/dev/nbd0")
    host.exit(first)  # kill -9
    assert mapper.mapped() == [] and orphans(host.sys_root, host.proc_root) == {"/dev/nbd0": mapping.details["cookie"]}
    record = record_of(nbd_mod.local_state(config), mapping)
    new = mapper.attach(record)
    assert new != first and open(os.path.join(host.sys_root, "block", "nbd0", "pid")).read() == "%d\n" % first
    (found,) = discover(host.sys_root, host.proc_root)
    assert (found.spec, found.device, found.details) == (
        ImageSpec("rbd", "vm1"), "/dev/nbd0", {"pid": new, "cookie": mapping.details["cookie"]})
    assert rbd_nbd.calls[-1] == [
        "rbd-nbd", "attach", "rbd/vm1", "-c", "/etc/ceph/c.conf", "--id", "dom0a", "--keyring",
        "/etc/ceph/dom0a.keyring", "--device", "/dev/nbd0", "--cookie", mapping.details["cookie"],
        "--reattach-timeout", "30", "--rbd_qos_iops_limit=50"]


def test_a_zombie_daemon_serves_nothing(host, mapper, config):
    """Killed but not yet reaped: its device is an orphan already (heal and unmap find it)."""
    pid = host.daemon("/dev/nbd3", ours(config, ImageSpec("rbd", "vm1"), cookie="z"), backend="z")
    host.zombie(pid)
    assert discover(host.sys_root, host.proc_root) == []
    assert orphans(host.sys_root, host.proc_root) == {"/dev/nbd3": "z"}


def test_a_pid_reused_by_another_devices_daemon_is_not_taken_for_it(host, mapper, config):
    """The dead first daemon's pid now belongs to nbd1's daemon: its cookie tells them apart."""
    pid = host.daemon("/dev/nbd1", ours(config, ImageSpec("rbd", "other"), cookie="cookie-b"), backend="cookie-b")
    host.connect("/dev/nbd0", pid, backend="cookie-a")  # nbd0's pid file holds the reused pid
    assert [(m.device, str(m.spec)) for m in mapper.mapped()] == [("/dev/nbd1", "rbd/other")]
    assert orphans(host.sys_root, host.proc_root) == {"/dev/nbd0": "cookie-a"}


# ---- attack: processes that only claim to be rbd-nbd -----------------------------------------------

FORGERIES = [
    pytest.param({"uid": NOBODY}, id="run-by-nobody"),
    pytest.param({"uid": NOBODY, "exe": RBD_NBD}, id="the-real-binary-run-by-nobody"),
    pytest.param({"exe": "/usr/bin/python3"}, id="root-but-python3"),
    pytest.param({"exe": "/tmp/rbd-nbd"}, id="root-but-another-rbd-nbd"),
    pytest.param({"exe": "/usr/bin/python3 (deleted)"}, id="root-but-deleted-python3"),
    pytest.param({"exe": None}, id="no-exe-to-read"),
]


@pytest.mark.parametrize("forged", FORGERIES)
def test_attack_a_forged_daemon_is_not_taken_for_a_healed_devices(mapper, rbd_nbd, host, config, forged):
    """comm and argv are a process's own to set, and --cookie is world-readable: a process
    named rbd-nbd with a healed device's cookie or `attach --device`, at a lower pid than the
    real new daemon, made find() report /dev/nbd0 as serving the attacker's image."""
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    cookie = mapping.details["cookie"]
    first = mapper.serving("/dev/nbd0")
    host.exit(first)  # the kernel keeps its pid in /sys/block/nbd0/pid
    evil = ImageSpec("rbd", "evil")
    forgeries = [host.spawn(["rbd-nbd", "attach", "rbd/evil", "--device", "/dev/nbd0"], **forged),
                 host.spawn(["rbd-nbd", "map", "rbd/evil", "--cookie", cookie], **forged)]
    assert mapper.find(evil, False) is None and mapper.mapped() == []
    assert orphans(host.sys_root, host.proc_root) == {"/dev/nbd0": cookie}
    new = mapper.attach(record_of(nbd_mod.local_state(config), mapping))
    assert max(forgeries) < new
    (found,) = discover(host.sys_root, host.proc_root)
    assert (found.spec, found.device, found.details["pid"]) == (ImageSpec("rbd", "vm1"), "/dev/nbd0", new)
    assert mapper.find(evil, False) is None
    assert [pid for pid, _argv in nbd_mod.daemons(host.proc_root)] == [new]


@pytest.mark.parametrize("forged", FORGERIES)
def test_attack_a_forged_daemon_at_the_pid_the_kernel_names_is_not_its_daemon(host, mapper, config, forged):
    """The dead daemon's pid, reused by a forgery with the device's cookie: no daemon serves it."""
    pid = host.daemon("/dev/nbd0", ours(config, ImageSpec("rbd", "evil"), cookie="c0"), backend="c0", **forged)
    assert mapper.mapped() == [] and orphans(host.sys_root, host.proc_root) == {"/dev/nbd0": "c0"}
    assert pid not in [p for p, _argv in nbd_mod.daemons(host.proc_root)]


@pytest.mark.parametrize("forged", FORGERIES)
def test_attack_a_given_up_maps_undo_signals_no_forged_daemon(mapper, host, config, signals, kernel, forged):
    host.spawn(ours(config, ImageSpec("rbd", "vm1")), **forged)
    mapper.discard_partial(ImageSpec("rbd", "vm1"), False)
    assert signals.sent == [] and kernel.calls == []


@pytest.mark.parametrize("exe", [RBD_NBD + " (deleted)", "/usr/sbin/rbd-nbd", "/usr/local/bin/rbd-nbd"])
def test_a_daemon_of_the_real_rbd_nbd_is_found_also_after_an_upgrade_replaced_it(host, mapper, config, exe):
    """An upgrade replaces /usr/bin/rbd-nbd under running daemons: their exe says " (deleted)"."""
    pid = host.daemon("/dev/nbd2", ours(config, ImageSpec("rbd", "vm1")), exe=exe)
    assert [(m.device, m.details["pid"]) for m in mapper.mapped()] == [("/dev/nbd2", pid)]


def test_a_daemon_of_the_rbd_nbd_on_path_is_found(host, mapper, config, monkeypatch, tmp_path):
    """block-rbd runs `rbd-nbd` from PATH: that one is the real one too."""
    tool = tmp_path / "opt" / "rbd-nbd"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tool.parent) + ":/usr/bin")
    pid = host.daemon("/dev/nbd1", ours(config, ImageSpec("rbd", "vm1")), exe=str(tool))
    assert [m.details["pid"] for m in mapper.mapped()] == [pid]


def test_a_device_whose_daemon_is_gone_is_unmapped_through_netlink(mapper, rbd_nbd, host, config, kernel):
    """remove with the daemon gone (never healed): the record's cookie names the device, and
    NBD_CMD_DISCONNECT ends it (the ioctl would reach only its dead socket)."""
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    record_of(nbd_mod.local_state(config), mapping)
    host.exit(mapper.serving("/dev/nbd0"))
    (orphan,) = mapper.mapped()
    assert (orphan.spec, orphan.device, orphan.details) == (
        ImageSpec("rbd", "vm1"), "/dev/nbd0", {"pid": None, "cookie": mapping.details["cookie"]})
    mapper.unmap(mapper.find(ImageSpec("rbd", "vm1"), False))
    assert kernel.via == ["netlink"] and host.connected() == []


def test_heal_attaches_a_new_daemon_to_a_device_whose_daemon_is_gone(mapper, rbd_nbd, host, config, logged):
    state = nbd_mod.local_state(config)
    mapping = mapper.map(ImageSpec("rbd", "vm1"), True)
    record_of(state, mapping)
    alive = mapper.map(ImageSpec("rbd", "vm2"), False)
    record_of(state, alive)
    assert nbd_mod.heal(config, mapper=mapper) == []  # all well: nothing started
    assert len(rbd_nbd.calls) == 2
    host.exit(mapper.serving("/dev/nbd0"))
    (healed,) = nbd_mod.heal(config, mapper=mapper)
    assert healed == ("/dev/nbd0", mapper.serving("/dev/nbd0"))
    assert rbd_nbd.calls[-1][:3] == ["rbd-nbd", "attach", "rbd/vm1"] and "--read-only" in rbd_nbd.calls[-1]
    # each daemon in a scope unit of its own (under systemd), named for its image
    assert rbd_nbd.scopes == [process.Scope("nbd", "rbd/vm1"), process.Scope("nbd", "rbd/vm2"),
                              process.Scope("nbd", "rbd/vm1")]
    assert [m.device for m in mapper.mapped()] == ["/dev/nbd0", "/dev/nbd1"]
    line = [r.getMessage() for r in logged.records if "was gone" in r.getMessage()]
    assert len(line) == 1 and re.fullmatch(
        r"upkeep: the rbd-nbd daemon of /dev/nbd0 \(rbd/vm1\) was gone: rbd-nbd \d+ attached in \d+\.\d s", line[0])
    assert nbd_mod.heal(config, mapper=mapper) == []


def test_heal_leaves_an_image_a_run_holds_locked_to_that_run(mapper, rbd_nbd, host, config):
    state = nbd_mod.local_state(config)
    record_of(state, mapper.map(ImageSpec("rbd", "vm1"), False))
    host.exit(mapper.serving("/dev/nbd0"))
    with state.lock(ImageSpec("rbd", "vm1")):
        assert nbd_mod.heal(config, mapper=mapper) == []
    assert len(nbd_mod.heal(config, mapper=mapper)) == 1


def test_heal_of_a_device_no_longer_connected_says_so_and_starts_nothing(mapper, rbd_nbd, host, config, logged,
                                                                       kernel):
    state = nbd_mod.local_state(config)
    record_of(state, mapper.map(ImageSpec("rbd", "vm1"), False))
    host.exit(mapper.serving("/dev/nbd0"))
    host.disconnect("/dev/nbd0")  # someone disconnected it meanwhile
    calls = len(rbd_nbd.calls)
    assert nbd_mod.heal(config, mapper=mapper) == [] and nbd_mod.heal(config, mapper=mapper) == []
    assert len(rbd_nbd.calls) == calls
    said = [r.getMessage() for r in logged.records if "is no longer connected" in r.getMessage()]
    assert said == ["upkeep: /dev/nbd0 (rbd/vm1) has lost its rbd-nbd daemon and is no longer connected; "
                    "detach the disk and attach it again"]  # once, not every round


def test_a_failed_heal_is_one_log_line(mapper, rbd_nbd, host, config, logged):
    state = nbd_mod.local_state(config)
    record_of(state, mapper.map(ImageSpec("rbd", "vm1"), False))
    host.exit(mapper.serving("/dev/nbd0"))
    rbd_nbd._attach = lambda argv: (_ for _ in ()).throw(CommandError(
        "rbd-nbd attach failed", returncode=1, stderr="rbd-nbd: failed to open image: (2) No such file\n"))
    assert nbd_mod.heal(config, mapper=mapper) == []
    (line,) = [r.getMessage() for r in logged.records if r.levelname == "ERROR"]
    assert line == ("upkeep: the rbd-nbd daemon of /dev/nbd0 (rbd/vm1) is gone and a new one failed: rbd-nbd "
                    "attach of rbd/vm1 to /dev/nbd0 failed: rbd-nbd: failed to open image: (2) No such file")


def test_restart_replaces_each_daemon_and_keeps_the_devices(mapper, rbd_nbd, host, config, signals, mocker):
    state = nbd_mod.local_state(config)
    for name in ("vm1", "vm2"):
        record_of(state, mapper.map(ImageSpec("rbd", name), False))
    before = [mapper.serving(d) for d in ("/dev/nbd0", "/dev/nbd1")]
    registry = mocker.MagicMock()
    registry.rehome.side_effect = lambda cluster, spec, holders, start, fence: start()
    done = nbd_mod.restart(config, mocker.sentinel.cluster, registry, mapper)
    after = [mapper.serving(d) for d in ("/dev/nbd0", "/dev/nbd1")]
    assert done == [("/dev/nbd0", before[0], after[0]), ("/dev/nbd1", before[1], after[1])]
    assert signals.sent == before and set(after).isdisjoint(before)
    assert host.connected() == ["nbd0", "nbd1"]  # the devices never went away
    # the registrations name the new daemons; the old ones exited cleanly: nothing fenced
    assert [(c.args[1], c.kwargs["fence"]) for c in registry.rehome.call_args_list] == [
        (ImageSpec("rbd", "vm1"), False), (ImageSpec("rbd", "vm2"), False)]


def test_restart_refuses_a_device_set_up_by_ioctl(mapper, rbd_nbd, host, config, signals, mocker):
    rbd_nbd.netlink = False
    record_of(nbd_mod.local_state(config), mapper.map(ImageSpec("rbd", "vm1"), False))
    with pytest.raises(MapperError, match=r"^/dev/nbd0 \(rbd/vm1\) was mapped by ioctl, without a cookie: its "
                                          r"daemon cannot be replaced live; detach and attach the disk$"):
        nbd_mod.restart(config, mocker.sentinel.cluster, mocker.MagicMock(), mapper)
    assert signals.sent == []


def test_a_given_up_map_whose_netlink_device_outlived_its_daemon_is_unmapped(mapper, host, config, kernel,
                                                                            monkeypatch):
    """A given-up map's daemon connects its netlink device just as the SIGTERM comes: it
    exits, the device stays; it is found by the cookie on the daemon's command line."""
    late = host.spawn(ours(config, ImageSpec("rbd", "vm1"), cookie="given-up"))

    def terminate(pid):
        host.connect("/dev/nbd2", pid, backend="given-up")
        host.exit(pid)
    monkeypatch.setattr(nbd_mod, "terminate", terminate)
    mapper.discard_partial(ImageSpec("rbd", "vm1"), False)
    assert kernel.calls == ["/dev/nbd2"] and kernel.via == ["netlink"] and host.connected() == []
    assert not os.path.exists(os.path.join(host.proc_root, str(late)))


# ---- resize: rbd-nbd 16.2's netlink resize is refused by the kernel ------------------------------

class FakeNetlink:
    """nbd_netlink.Nbd at its interface: RECONFIGURE with a size resizes the device when
    the backend identifier matches the device's (as nbd_genl_reconfigure checks)."""

    def __init__(self, host):
        self.host = host
        self.calls = []

    def __call__(self, timeout=None):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def resize(self, index, size, backend):
        self.calls.append((index, size, backend))
        if self.host.backend("/dev/nbd%d" % index) != backend:
            raise OSError(errno.EINVAL, "Invalid argument")
        self.host.resize("/dev/nbd%d" % index, size)

    def set_timeout(self, index, seconds, backend):
        self.calls.append((index, "timeout", seconds, backend))
        if self.host.backend("/dev/nbd%d" % index) != backend:
            raise OSError(errno.EINVAL, "Invalid argument")


@pytest.fixture(autouse=True)
def netlink(host, monkeypatch):
    """The kernel's nbd netlink family, for every test here: none talks to the real one."""
    fake = FakeNetlink(host)
    monkeypatch.setattr(nbd_mod.nbd_netlink, "Nbd", fake)
    return fake


# ---- heal: what the dead daemon held is sent again -----------------------------------------------

def test_a_heal_gives_the_device_a_request_timeout_for_a_window_then_none(
        mapper, rbd_nbd, host, config, netlink, logged):
    """The kernel sends a request again only when it times out; with none the healed disk hung."""
    state = nbd_mod.local_state(config)
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    record_of(state, mapping)
    cookie = mapping.details["cookie"]
    host.exit(mapper.serving("/dev/nbd0"))
    assert len(nbd_mod.heal(config, mapper=mapper)) == 1
    assert netlink.calls == [(0, "timeout", nbd_mod.HEAL_IO_TIMEOUT, cookie)]
    assert nbd_mod.end_request_timeouts(config, mapper) == []  # within the window
    later = time.monotonic() + nbd_mod.HEAL_WINDOW + 1
    assert nbd_mod.end_request_timeouts(config, mapper, now=later) == ["/dev/nbd0"]
    assert netlink.calls[-1] == (0, "timeout", 0, cookie)
    assert nbd_mod.end_request_timeouts(config, mapper, now=later) == [] and len(netlink.calls) == 2
    assert "upkeep: /dev/nbd0: the request timeout of its heal is over, none again" in [
        r.getMessage() for r in logged.records]


def test_a_restart_gives_the_device_the_same_window_and_upkeep_ends_it(
        mapper, rbd_nbd, host, config, netlink, signals, mocker, logged):
    """A daemon that exits on SIGTERM shuts its socket before its last replies: what it
    took last is sent again on its timeout.  The window is on file: restart-nbd is a
    process of its own, and upkeep (another) ends it."""
    state = nbd_mod.local_state(config)
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    record_of(state, mapping)
    cookie = mapping.details["cookie"]
    registry = mocker.MagicMock()
    registry.rehome.side_effect = lambda cluster, spec, holders, start, fence: start()
    nbd_mod.restart(config, mocker.sentinel.cluster, registry, mapper)
    assert netlink.calls == [(0, "timeout", nbd_mod.HEAL_IO_TIMEOUT, cookie)]
    (timeout,) = state.request_timeouts()
    assert (timeout["device"], timeout["cookie"], timeout["image"], timeout["after"]) == (
        "/dev/nbd0", cookie, "rbd/vm1", "restart")
    assert nbd_mod.end_request_timeouts(config, mapper) == []  # within the window
    assert nbd_mod.end_request_timeouts(config, mapper, now=timeout["until"]) == ["/dev/nbd0"]
    assert netlink.calls[-1] == (0, "timeout", 0, cookie) and state.request_timeouts() == []
    assert "upkeep: /dev/nbd0: the request timeout of its restart is over, none again" in [
        r.getMessage() for r in logged.records]


def test_a_restart_within_a_heals_window_moves_its_end_on(mapper, rbd_nbd, host, config, netlink, signals,
                                                          mocker):
    state = nbd_mod.local_state(config)
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    record_of(state, mapping)
    host.exit(mapper.serving("/dev/nbd0"))
    nbd_mod.heal(config, mapper=mapper)
    heal_ends = time.monotonic() + 10  # the heal was 30 s ago
    state.set_request_timeout("/dev/nbd0", mapping.details["cookie"], "rbd/vm1", heal_ends, "heal")
    registry = mocker.MagicMock()
    registry.rehome.side_effect = lambda cluster, spec, holders, start, fence: start()
    nbd_mod.restart(config, mocker.sentinel.cluster, registry, mapper)
    (timeout,) = state.request_timeouts()
    assert timeout["after"] == "restart" and timeout["until"] > heal_ends + 20
    assert nbd_mod.end_request_timeouts(config, mapper, now=heal_ends) == []
    assert nbd_mod.end_request_timeouts(config, mapper, now=timeout["until"]) == ["/dev/nbd0"]
    assert [c[2] for c in netlink.calls] == [nbd_mod.HEAL_IO_TIMEOUT, nbd_mod.HEAL_IO_TIMEOUT, 0]


def test_a_restart_whose_timeout_is_refused_says_so_in_one_line_and_stands(
        mapper, rbd_nbd, host, config, netlink, signals, mocker, logged):
    state = nbd_mod.local_state(config)
    record_of(state, mapper.map(ImageSpec("rbd", "vm1"), False))
    netlink.set_timeout = lambda index, seconds, backend: (_ for _ in ()).throw(OSError(errno.EPERM, "denied"))
    registry = mocker.MagicMock()
    registry.rehome.side_effect = lambda cluster, spec, holders, start, fence: start()
    ((device, old, new),) = nbd_mod.restart(config, mocker.sentinel.cluster, registry, mapper)
    assert new == mapper.serving("/dev/nbd0") != old
    (line,) = [r.getMessage() for r in logged.records if r.levelname == "ERROR"]
    assert line == ("/dev/nbd0 (rbd/vm1): no request timeout set ([Errno 1] denied): a request its old daemon "
                    "held may never complete")
    assert state.request_timeouts() == []


def test_a_window_whose_image_is_locked_ends_in_a_later_round(mapper, rbd_nbd, host, config, netlink, slots):
    state = nbd_mod.local_state(config)
    record_of(state, mapper.map(ImageSpec("rbd", "vm1"), False))
    host.exit(mapper.serving("/dev/nbd0"))
    nbd_mod.heal(config, mapper=mapper)
    (timeout,) = state.request_timeouts()
    with slots.lock(ImageSpec("rbd", "vm1")):  # a hotplug run or a restart holds the image
        assert nbd_mod.end_request_timeouts(config, mapper, now=timeout["until"]) == []
    assert len(netlink.calls) == 1
    assert nbd_mod.end_request_timeouts(config, mapper, now=timeout["until"]) == ["/dev/nbd0"]


def test_a_disk_with_its_own_request_timeout_keeps_it_through_a_heal_and_a_restart(host, rbd_nbd, netlink,
                                                                                    signals, mocker):
    config = from_dict({"ceph": {"conf": "/c", "id": "dom0a", "keyring": "/k"},
                        "nbd": {"options": ["io_timeout=120"]}})
    mapper = NbdMapper(config, sys_root=host.sys_root, proc_root=host.proc_root)
    record_of(nbd_mod.local_state(config), mapper.map(ImageSpec("rbd", "vm1"), False))
    host.exit(mapper.serving("/dev/nbd0"))
    assert len(nbd_mod.heal(config, mapper=mapper)) == 1
    assert netlink.calls == [] and "--io-timeout" in rbd_nbd.calls[-1]
    registry = mocker.MagicMock()
    registry.rehome.side_effect = lambda cluster, spec, holders, start, fence: start()
    nbd_mod.restart(config, mocker.sentinel.cluster, registry, mapper)  # nor through a restart
    assert netlink.calls == [] and nbd_mod.local_state(config).request_timeouts() == []


def test_a_refused_timeout_is_one_error_line_and_the_heal_stands(mapper, rbd_nbd, host, config, netlink, logged):
    state = nbd_mod.local_state(config)
    record_of(state, mapper.map(ImageSpec("rbd", "vm1"), False))
    host.exit(mapper.serving("/dev/nbd0"))
    netlink.set_timeout = lambda index, seconds, backend: (_ for _ in ()).throw(OSError(errno.EPERM, "denied"))
    (healed,) = nbd_mod.heal(config, mapper=mapper)
    assert healed[1] == mapper.serving("/dev/nbd0")
    (line,) = [r.getMessage() for r in logged.records if r.levelname == "ERROR"]
    assert line == ("upkeep: /dev/nbd0 (rbd/vm1): no request timeout set ([Errno 1] denied): a request its "
                    "dead daemon held may never complete")
    assert nbd_mod.end_request_timeouts(config, mapper, now=time.monotonic() + 3600) == []


def test_the_window_of_a_device_disconnected_meanwhile_ends_without_a_call(mapper, rbd_nbd, host, config, netlink):
    state = nbd_mod.local_state(config)
    record_of(state, mapper.map(ImageSpec("rbd", "vm1"), False))
    host.exit(mapper.serving("/dev/nbd0"))
    nbd_mod.heal(config, mapper=mapper)
    host.disconnect("/dev/nbd0")
    assert nbd_mod.end_request_timeouts(config, mapper, now=time.monotonic() + 3600) == ["/dev/nbd0"]
    assert len(netlink.calls) == 1


def test_a_device_that_lags_its_image_is_resized_with_its_cookie(mapper, rbd_nbd, host, netlink, logged):
    mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    assert mapper.follow_size(mapping) == 32 << 20 and netlink.calls == []  # size unknown: nothing to do
    assert mapper.follow_size(mapping, 48 << 20) == 48 << 20
    assert netlink.calls == [(0, 48 << 20, mapping.details["cookie"])]
    assert mapper.follow_size(mapping, 48 << 20) == 48 << 20 and len(netlink.calls) == 1  # once
    assert "/dev/nbd0 follows rbd/vm1: now 50331648 bytes (netlink resize)" in [r.getMessage() for r in logged.records]


def test_follow_sizes_asks_the_cluster_for_block_rbds_own_devices_only(mapper, rbd_nbd, host, config, netlink,
                                                                       mocker):
    state = nbd_mod.local_state(config)
    ours_mapping = mapper.map(ImageSpec("rbd", "vm1"), False)
    record_of(state, ours_mapping)
    host.daemon("/dev/nbd5", ["rbd-nbd", "map", "rbd/theirs", "--cookie", "x"], backend="x")  # not block-rbd's
    cluster = mocker.MagicMock()
    sizes = mocker.patch("block_rbd.registry.image_size", return_value=40 << 20)
    assert nbd_mod.follow_sizes(config, cluster, mapper) == [("/dev/nbd0", 40 << 20)]
    assert [c.args[1] for c in sizes.call_args_list] == [ImageSpec("rbd", "vm1")]
    assert nbd_mod.follow_sizes(config, cluster, mapper) == []  # already there


def test_follow_sizes_without_nbd_records_never_reaches_the_cluster(mapper, host, config, mocker):
    cluster = mocker.MagicMock()
    assert nbd_mod.follow_sizes(config, cluster, mapper) == []
    cluster.ioctx.assert_not_called()


def test_heal_with_the_cluster_fences_the_dead_daemon_and_rehomes_its_registrations(
        mapper, rbd_nbd, host, config, mocker):
    state = nbd_mod.local_state(config)
    record = record_of(state, mapper.map(ImageSpec("rbd", "vm1"), False), holder="backend/vbd/5/51712")
    host.exit(mapper.serving("/dev/nbd0"))
    registry = mocker.MagicMock()
    registry.rehome.side_effect = lambda cluster, spec, holders, start: start()
    (healed,) = nbd_mod.heal(config, mocker.sentinel.cluster, registry, mapper=mapper)
    (call,) = registry.rehome.call_args_list
    assert call.args[:3] == (mocker.sentinel.cluster, ImageSpec("rbd", "vm1"), ["backend/vbd/5/51712"])
    assert healed == ("/dev/nbd0", mapper.serving("/dev/nbd0")) and record.device == "/dev/nbd0"


def test_heal_without_an_answer_from_the_cluster_still_attaches(mapper, rbd_nbd, host, config, mocker, logged):
    state = nbd_mod.local_state(config)
    record_of(state, mapper.map(ImageSpec("rbd", "vm1"), False))
    host.exit(mapper.serving("/dev/nbd0"))
    registry = mocker.MagicMock()
    registry.rehome.side_effect = ClusterError("cannot reach the cluster: timed out")
    (healed,) = nbd_mod.heal(config, mocker.sentinel.cluster, registry, mapper=mapper)
    assert healed[1] == mapper.serving("/dev/nbd0")
    assert any("the cluster did not answer (cannot reach the cluster: timed out); attaching without fencing"
               in r.getMessage() for r in logged.records)


def test_sweep_disconnects_our_orphans_that_no_record_names_and_nothing_else(mapper, rbd_nbd, host, config,
                                                                             kernel, logged):
    state = nbd_mod.local_state(config)
    recorded = mapper.map(ImageSpec("rbd", "vm1"), False)
    record_of(state, recorded)
    host.exit(mapper.serving("/dev/nbd0"))                          # healable: upkeep heals it
    left = host.daemon("/dev/nbd4", ours(config, ImageSpec("rbd", "gone"), cookie="brbd-x"), backend="brbd-x")
    host.exit(left)                                                 # a given-up map's leftover
    theirs = host.daemon("/dev/nbd6", ["rbd-nbd", "map", "rbd/t", "--cookie", "y"], backend="y")
    host.exit(theirs)                                               # not ours: left alone
    assert nbd_mod.sweep(config, mapper) == ["/dev/nbd4"]
    assert kernel.calls == ["/dev/nbd4"] and host.connected() == ["nbd0", "nbd6"]
    assert "upkeep: disconnected /dev/nbd4, left without daemon or record by a map that was given up" in [
        r.getMessage() for r in logged.records]
    assert nbd_mod.sweep(config, mapper) == []
