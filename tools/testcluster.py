#!/usr/bin/python3
"""Throwaway single-node Ceph cluster (mon + mgr + memstore osd, cephx on).

Used by the test suite, the demo and the benchmarks.  Everything the cluster
owns (config, keyrings, mon/mgr/osd data, logs, admin sockets, pid files)
lives in one directory, no systemd is involved, and stop() removes it all.

The daemons are this host's Ceph, or with `suite` (--suite trixie) another Debian
release's, run from a root tools/debianroot.py builds: a Ceph 18.2 cluster that this
host's Ceph 16.2 clients and a Debian 13 root's clients both talk to.  The ceph and
rados CLIs the class itself runs are always this host's.

CLI:
    python3 tools/testcluster.py start DIR [--addr IP] [--suite S]  # prints JSON, daemons stay up
    python3 tools/testcluster.py status DIR
    python3 tools/testcluster.py restart-mon DIR [--down S]  # daemons stay up
    python3 tools/testcluster.py stop DIR [--keep]

Python:
    with TestCluster(tmpdir) as c:
        c.ceph("osd", "blocklist", "ls")
        env = c.client_env()

Stdlib only: it must run under /usr/bin/python3 before anything is installed.
"""

import argparse
import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid

__all__ = ["TestCluster", "CephError", "RBD_CAPS"]

# Least-privilege caps of the users the tests run as ("rbd pool init" users).
RBD_CAPS = {"mon": "profile rbd", "osd": "profile rbd", "mgr": "profile rbd"}

MON_ID = "a"
MGR_ID = "x"
OSD_ID = 0
DAEMONS = ("mon." + MON_ID, "mgr." + MGR_ID, "osd.%d" % OSD_ID)  # the mon first
POOL = "rbd"
POOL_PGS = 8
START_TIMEOUT = 60.0
# Bounds every call of a ceph binary: a hung daemon must fail a test, not hang it.
CMD_TIMEOUT = 60.0
# Marks a directory as ours, so start/stop never wipe a directory they did not make.
STATE_FILE = "testcluster.json"
MGR_MODULE_PATH = "/usr/share/ceph/mgr"
# The mgr loads only these: pacific's always-on modules (skipping one of them
# turns health to HEALTH_ERR MGR_MODULE_ERROR); rbd_support serves "rbd perf",
# trash/mirror schedules.
MGR_MODULES = ("balancer", "crash", "devicehealth", "orchestrator", "pg_autoscaler", "progress",
               "rbd_support", "status", "telemetry", "volumes")


class CephError(RuntimeError):
    """A ceph command failed, or the cluster did not come up."""


def _free_ports(addr, count):
    """Pick `count` distinct free TCP ports on addr (held together so they differ)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            try:
                s.bind((addr, 0))
            except OSError as e:
                raise CephError("cannot bind to %s (an address of this host/netns?): %s"
                                % (addr, e))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _fmt_addr(addr, port):
    return "[%s]:%d" % (addr, port) if ":" in addr else "%s:%d" % (addr, port)


def _pid_alive(pid):
    """True for a live, non-zombie process."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _json_docs(text):
    """All JSON values in text, one after another; None if it is not JSON."""
    dec = json.JSONDecoder()
    docs, i, text = [], 0, text.strip()
    while i < len(text):
        try:
            doc, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        docs.append(doc)
        while i < len(text) and text[i].isspace():
            i += 1
    return docs


def _mgr_modules_to_skip(root=None):
    path = (root or "") + MGR_MODULE_PATH
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return sorted(n for n in names if n not in MGR_MODULES
                  and os.path.isdir(os.path.join(path, n)))


def _tail(path, lines=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return "(%s)" % e


class TestCluster:
    """A real single-node Ceph cluster rooted at `directory`.

    Attaches to a cluster started earlier in the same directory (e.g. by the
    CLI), so another process can call ceph(), kill_osd(), stop() on it.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, directory, addr="127.0.0.1", suite=None):
        self.dir = os.path.abspath(directory)
        self.addr = addr
        self.suite = suite
        self.root = None  # the Debian root the daemons run from (suite), None: this host
        self.conf = os.path.join(self.dir, "ceph.conf")
        self.admin_keyring = os.path.join(self.dir, "ceph.client.admin.keyring")
        self.user = "blockrbd"
        self.user_keyring = self.keyring_path(self.user)
        self.pool = POOL
        self.fsid = None
        self.mon_addrs = []
        self.stop_at_exit = True  # the CLI turns this off to leave daemons running
        self._procs = {}  # daemon name -> Popen, to reap the children we started
        self._atexit = False
        self._run = os.path.join(self.dir, "run")
        self._log = os.path.join(self.dir, "log")
        state = self._load_state()
        if state:
            self.addr = state["addr"]
            self.fsid = state["fsid"]
            self.mon_addrs = [tuple(a) for a in state["mon_addrs"]]
            self.suite, self.root = state.get("suite"), state.get("root")

    # ---- paths and state -------------------------------------------------

    def keyring_path(self, name):
        return os.path.join(self.dir, "ceph.client.%s.keyring" % name)

    def _state_path(self):
        return os.path.join(self.dir, STATE_FILE)

    def _load_state(self):
        try:
            with open(self._state_path()) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _pidfile(self, name):
        return os.path.join(self._run, "%s.pid" % name)

    def _daemon_pid(self, name):
        """Pid of daemon `name` if it is alive and really ours (guards pid reuse)."""
        try:
            with open(self._pidfile(name)) as f:
                pid = int(f.read().strip())
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                cmdline = f.read().split(b"\0")
        except (OSError, ValueError):
            return None
        if self.conf.encode() not in cmdline or not _pid_alive(pid):
            return None
        return pid

    def mon_host(self):
        return "[%s]" % ",".join(
            "%s:%s" % (proto, _fmt_addr(ip, port)) for proto, ip, port in self.mon_addrs)

    def client_env(self):
        """What a client needs to reach the cluster as the least-privilege user."""
        return {
            "dir": self.dir,
            "conf": self.conf,
            "user": self.user,
            "keyring": self.user_keyring,
            "admin_keyring": self.admin_keyring,
            "pool": self.pool,
            "fsid": self.fsid,
            "mon_host": self.mon_host(),
            "addr": self.addr,
        }

    # ---- running ceph binaries --------------------------------------------

    def _daemon_argv(self, argv):
        """argv of a Ceph daemon or of a tool that writes a daemon's formats."""
        if not self.root:
            return argv
        import debianroot
        return debianroot.in_root(self.root, argv, binds=[self.dir])

    def version(self):
        """The daemons' Ceph version, e.g. "18.2.7"."""
        out = self._run_cmd(self._daemon_argv(["ceph-mon", "--version"]))
        return out.split()[2]

    @staticmethod
    def _env():
        # A caller's CEPH_ARGS/CEPH_CONF must not redirect us to another cluster.
        env = dict(os.environ)
        env.pop("CEPH_ARGS", None)
        env.pop("CEPH_CONF", None)
        return env

    def _run_cmd(self, args, timeout=CMD_TIMEOUT):
        try:
            p = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=timeout, env=self._env())
        except subprocess.TimeoutExpired:
            raise CephError("timed out after %ss: %s" % (timeout, " ".join(args)))
        if p.returncode != 0:
            raise CephError("%s failed (exit %d): %s" % (
                " ".join(args), p.returncode,
                (p.stderr or p.stdout).decode(errors="replace").strip()))
        return p.stdout.decode(errors="replace")

    def ceph(self, *args, timeout=30):
        """Run the ceph CLI as client.admin; return parsed JSON (None if no output).

        The keyring goes by file, never as a key on the command line.
        """
        out = self._run_cmd(
            ["ceph", "-c", self.conf, "--id", "admin", "--keyring", self.admin_keyring,
             "--connect-timeout", str(max(1, int(timeout) - 5)), "--format", "json"]
            + [str(a) for a in args], timeout=timeout)
        docs = _json_docs(out)
        if docs is None:
            return out.strip()  # a few commands print plain text even with --format json
        if len(docs) <= 1:
            return docs[0] if docs else None
        # pacific's "osd blocklist ls" prints two arrays back to back (addresses,
        # then ranges): '[{"addr":...}][]'
        if all(isinstance(d, list) for d in docs):
            return [x for d in docs for x in d]
        return docs

    def rados(self, *args, user=None, timeout=30):
        """Run the rados CLI as `user` (default: the least-privilege user)."""
        user = user or self.user
        return self._run_cmd(
            ["rados", "-c", self.conf, "--id", user, "--keyring", self.keyring_path(user),
             "--client_mount_timeout", "10", "--rados_osd_op_timeout", "10"]
            + [str(a) for a in args], timeout=timeout)

    # ---- set-up --------------------------------------------------------------

    def _write_conf(self):
        d = self.dir
        conf = """\
# Generated by tools/testcluster.py: throwaway test cluster, do not edit.
[global]
fsid = {fsid}
mon_host = {mon_host}
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
run_dir = {d}/run
crash_dir = {d}/crash
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
osd_pool_default_pg_num = {pgs}
osd_pool_default_pgp_num = {pgs}
osd_pool_default_pg_autoscale_mode = off
osd_crush_chooseleaf_type = 0
mon_allow_pool_delete = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim_allowed = false

[client]
# lets "ceph -c CONF --id NAME" find keyrings made by make_user() without --keyring
keyring = {d}/ceph.$name.keyring

[mon]
mon_data = {d}/mon
public_addr = {addr}
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
mon_cluster_log_to_file = false
# quick paxos: the cluster is up in ~1.5 s instead of ~5 s
paxos_propose_interval = 0.05
paxos_min_wait = 0.01
# the default ones (restful iostat nfs) are not loaded: enabled, they would fail
mgr_initial_modules =

[mgr]
mgr_data = {d}/mgr
keyring = {d}/mgr/keyring
public_addr = {addr}
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
# PG states reach "ceph pg ..." within a second
mgr_stats_period = 1
# loading all ~30 python modules takes the mgr ~5 s: skip all but MGR_MODULES
mgr_disabled_modules = {mgr_disabled}

[osd]
osd_data = {d}/osd
keyring = {d}/osd/keyring
public_addr = {addr}
cluster_addr = {addr}
log_file = {d}/log/$name.log
pid_file = {d}/run/$name.pid
osd_objectstore = memstore
# memstore keeps everything in RAM: bound it
memstore_device_bytes = {memstore}
# a fast shutdown skips the umount that saves memstore's data to osd_data:
# kill_osd() + start_osd() must find the images again
osd_fast_shutdown = false
# A PG's read lease (osd_heartbeat_grace x this ratio; default 20 s x 0.8) that runs out
# while the OSD is stopped makes the PG laggy, and in a size-1 pool no peer renews it: it
# stays laggy, and every op to it hangs, for good (seen after a 20 s SIGSTOP, with
# `ceph pg repeer` no help).  With 80 s a stop of up to 40 s cannot run it out.
osd_pool_default_read_lease_ratio = 4
""".format(fsid=self.fsid, mon_host=self.mon_host(), d=d, addr=self.addr,
           pgs=POOL_PGS, memstore=2 << 30,
           mgr_disabled=" ".join(_mgr_modules_to_skip(self.root)))
        with open(self.conf, "w") as f:
            f.write(conf)

    def _authtool(self, path, entity, caps):
        args = ["ceph-authtool", "--create-keyring", path, "--gen-key", "-n", entity]
        for svc, cap in caps.items():
            args += ["--cap", svc, cap]
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)

    def _make_keys(self):
        os.makedirs(os.path.join(self.dir, "mgr"))
        os.makedirs(os.path.join(self.dir, "osd"))
        mon_keyring = os.path.join(self.dir, "mon.keyring")
        keys = [
            (mon_keyring, "mon.", {"mon": "allow *"}),
            (self.admin_keyring, "client.admin",
             {"mon": "allow *", "osd": "allow *", "mgr": "allow *", "mds": "allow *"}),
            (os.path.join(self.dir, "mgr", "keyring"), "mgr." + MGR_ID,
             {"mon": "allow profile mgr", "osd": "allow *", "mds": "allow *"}),
            (os.path.join(self.dir, "osd", "keyring"), "osd.%d" % OSD_ID,
             {"mon": "allow profile osd", "mgr": "allow profile osd", "osd": "allow *"}),
            (self.user_keyring, "client." + self.user, RBD_CAPS),
        ]
        # ceph-authtool takes one key per call; run them side by side
        procs = [(self._authtool(p, e, c), e) for p, e, c in keys]
        errors = []
        for proc, entity in procs:
            _, err = proc.communicate(timeout=CMD_TIMEOUT)
            if proc.returncode:
                errors.append("ceph-authtool %s: %s" % (entity, err.decode().strip()))
        if errors:
            raise CephError("; ".join(errors))
        for path, _, _ in keys:
            os.chmod(path, 0o600)
        # the mon knows every key from its first second: no "auth add" round trips
        for path, _, _ in keys[1:]:
            self._run_cmd(["ceph-authtool", mon_keyring, "--import-keyring", path])
        return mon_keyring

    def _spawn(self, name, args):
        """Start a daemon in the foreground of its own session, stdio to a log.

        Own session and no inherited stdout: `start` can exit (and a caller's
        capture_output can return) while the daemon runs on.
        """
        out = open(os.path.join(self._log, "%s.stdout" % name), "ab")
        try:
            # cwd /, as systemd starts them: Debian 13's ceph-osd finds its object classes
            # (libcls_rbd.so) through a path relative to it (lib/x86_64-linux-gnu/rados-classes)
            p = subprocess.Popen(self._daemon_argv(args + ["-f", "-c", self.conf]),
                                 stdin=subprocess.DEVNULL, cwd="/",
                                 stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True, close_fds=True, env=self._env())
        finally:
            out.close()
        # written now so stop() finds it even if the daemon dies before writing its own
        with open(self._pidfile(name), "w") as f:
            f.write("%d\n" % p.pid)
        self._procs[name] = p
        return p

    def _start_mon(self):
        self._spawn("mon." + MON_ID, ["ceph-mon", "-i", MON_ID])

    def _start_mgr(self):
        self._spawn("mgr." + MGR_ID, ["ceph-mgr", "-i", MGR_ID])

    def _start_osd(self):
        self._spawn("osd.%d" % OSD_ID, ["ceph-osd", "-i", str(OSD_ID)])

    def start(self):
        """Create and start the cluster; return once it serves rbd I/O.

        On failure the daemons are killed and the directory (logs) is kept.
        """
        t0 = time.monotonic()
        self._clean()
        try:
            self._start(t0)
        except BaseException:
            self.stop(keep=True)
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _start(self, t0):
        self.fsid = str(uuid.uuid4())
        v2, v1 = _free_ports(self.addr, 2)
        self.mon_addrs = [("v2", self.addr, v2), ("v1", self.addr, v1)]
        if self.suite:
            import debianroot
            self.root = debianroot.build(self.suite)
        # first file written: from now on start/stop may wipe this directory
        with open(self._state_path(), "w") as f:
            json.dump({"fsid": self.fsid, "addr": self.addr, "mon_addrs": self.mon_addrs,
                       "suite": self.suite, "root": self.root}, f)
        for sub in ("run", "log", "crash"):
            os.makedirs(os.path.join(self.dir, sub))
        if self.stop_at_exit and not self._atexit:
            atexit.register(self._stop_at_exit)
            self._atexit = True
        self._write_conf()
        mon_keyring = self._make_keys()
        osd_uuid = str(uuid.uuid4())
        # the osd's mkfs needs no mon (fsid is in the conf): run it beside the mon's
        osd_mkfs = subprocess.Popen(
            self._daemon_argv(["ceph-osd", "-c", self.conf, "-i", str(OSD_ID), "--mkfs",
                               "--osd-uuid", osd_uuid, "--no-mon-config"]),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=self._env())
        try:
            monmap = os.path.join(self.dir, "monmap")
            self._run_cmd(self._daemon_argv(["monmaptool", "--create", "--fsid", self.fsid,
                                             "--addv", MON_ID, self.mon_host(), monmap]))
            self._run_cmd(self._daemon_argv(["ceph-mon", "-c", self.conf, "--mkfs", "-i", MON_ID,
                                             "--monmap", monmap, "--keyring", mon_keyring]))
            self._start_mon()
            self._start_mgr()
            out, _ = osd_mkfs.communicate(timeout=CMD_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._fail("ceph-osd --mkfs did not finish in %ds" % CMD_TIMEOUT)
        finally:
            if osd_mkfs.poll() is None:
                osd_mkfs.kill()
                osd_mkfs.wait()
        if osd_mkfs.returncode:
            self._fail("ceph-osd --mkfs failed (exit %s): %s" % (
                osd_mkfs.returncode, out.decode(errors="replace").strip()))
        deadline = t0 + START_TIMEOUT
        # the first command also waits for the mon's quorum of one
        self._retry(deadline, self.ceph, "osd", "new", osd_uuid, str(OSD_ID))
        self._start_osd()
        self.create_pool(POOL)
        self._wait_usable(deadline)

    def create_pool(self, name, pg_num=POOL_PGS):
        """Create a size-1 pool initialised for rbd (like "rbd pool init")."""
        self.ceph("osd", "pool", "create", name, str(pg_num), str(pg_num))
        self.ceph("osd", "pool", "application", "enable", name, "rbd")

    def make_user(self, name, caps=None):
        """Create cephx user client.NAME (default: rbd profile caps); return its keyring.

        caps: {"mon": "profile rbd", "osd": "profile rbd pool=rbd", ...}.
        """
        caps = RBD_CAPS if caps is None else caps
        args = ["auth", "get-or-create", "client." + name]
        for svc, cap in caps.items():
            args += [svc, cap]
        entry = self.ceph(*args)[0]
        path = self.keyring_path(name)
        # 0600 from creation: the key is never world-readable, not even briefly
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("[%s]\n\tkey = %s\n" % (entry["entity"], entry["key"]))
        return path

    # ---- waiting -----------------------------------------------------------------

    def _retry(self, deadline, fn, *args):
        """Call fn until it stops raising CephError or the deadline passes."""
        while True:
            try:
                return fn(*args)
            except CephError as e:
                if time.monotonic() > deadline:
                    self._fail("cluster did not come up: %s" % e)
                time.sleep(0.1)

    def _pool_pgs_clean(self, pool):
        pgs = self.ceph("pg", "ls-by-pool", pool)["pg_stats"]
        states = sorted({pg["state"] for pg in pgs})
        return bool(pgs) and states == ["active+clean"], states

    def _osd_up_in(self):
        st = self.ceph("osd", "stat")
        return st["num_up_osds"] == 1 and st["num_in_osds"] == 1

    def _wait_usable(self, deadline):
        last = None
        while True:
            try:
                # PGs go active+clean only with the osd up and in: ask that first,
                # and the osd map once at the end (each ceph CLI call costs ~0.17 s)
                clean, states = self._pool_pgs_clean(POOL)
                last = "pg states of pool %s: %s" % (POOL, states)
                if clean and self._osd_up_in():
                    break
            except CephError as e:
                last = str(e)
            if time.monotonic() > deadline:
                self._fail("cluster not usable after %ds (%s)" % (START_TIMEOUT, last))
            time.sleep(0.1)
        # the proof that counts: the least-privilege user writes and reads back
        probe = os.path.join(self.dir, "probe")
        with open(probe, "wb") as f:
            f.write(b"testcluster probe\n")
        try:
            self._retry(deadline, self.rados, "-p", POOL, "put", "testcluster.probe", probe)
            got = self.rados("-p", POOL, "get", "testcluster.probe", "-")
            self.rados("-p", POOL, "rm", "testcluster.probe")
        finally:
            os.unlink(probe)
        if got != "testcluster probe\n":
            self._fail("probe object read back wrong: %r" % got)

    def _wait_gone(self, name, pid, timeout):
        """Wait for the process itself: a daemon drops its pid file before it exits."""
        deadline = time.monotonic() + timeout
        while True:
            p = self._procs.get(name)
            if p is not None and p.pid == pid and p.poll() is not None:
                del self._procs[name]  # reaped our child: no zombie left behind
            if not _pid_alive(pid):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def _fail(self, msg):
        logs = []
        for name in DAEMONS:
            for suffix in (".log", ".stdout"):
                path = os.path.join(self._log, name + suffix)
                if os.path.exists(path):
                    logs.append("--- %s (tail) ---\n%s" % (path, _tail(path)))
        raise CephError("%s\n%s" % (msg, "\n".join(logs)))

    # ---- failure simulation --------------------------------------------------------

    def _kill(self, names, grace=10.0):
        """SIGTERM (a clean exit, so memstore keeps its data), SIGKILL after grace."""
        pids = {n: self._daemon_pid(n) for n in names}
        pids = {n: pid for n, pid in pids.items() if pid}
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            for pid in pids.values():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            pids = {n: pid for n, pid in pids.items() if not self._wait_gone(n, pid, wait)}
            if not pids:
                return
        raise CephError("survived SIGKILL: %s" % ", ".join(
            "%s (pid %d)" % item for item in pids.items()))

    def kill_osd(self):
        """Stop the only OSD: I/O blocks or times out, like a cluster that is down."""
        self._kill(["osd.%d" % OSD_ID])

    def start_osd(self, timeout=START_TIMEOUT):
        self._start_osd()
        self._wait_usable(time.monotonic() + timeout)

    def kill_mon(self):
        """Stop the only mon: connects and mon commands fail (time out)."""
        self._kill(["mon." + MON_ID])

    def start_mon(self, timeout=START_TIMEOUT):
        """Start the mon again; return once the cluster serves I/O (not just mon commands).

        Right after a restart the mon answers `mon stat` before the OSD and the mgr are back
        with it; a test that goes on at once would see its first ops time out.
        """
        self._start_mon()
        deadline = time.monotonic() + timeout
        self._retry(deadline, self.ceph, "mon", "stat")
        self._wait_usable(deadline)

    # ---- tear-down ---------------------------------------------------------------

    def running(self):
        """{daemon name: pid or None} from the pid files."""
        return {n: self._daemon_pid(n) for n in DAEMONS}

    def stop(self, keep=False):
        """Kill all daemons and remove the directory unless keep.

        The mon goes last: an osd told to stop waits up to 5 s for the mon's ack.
        """
        self._kill(DAEMONS[1:])
        self._kill(DAEMONS[:1])
        if not keep and self._is_ours():
            shutil.rmtree(self.dir, ignore_errors=True)

    def _stop_at_exit(self):
        if self.stop_at_exit:
            try:
                self.stop()
            except CephError as e:
                print("testcluster: %s" % e, file=sys.stderr)

    def _is_ours(self):
        return os.path.exists(self._state_path())

    def _clean(self):
        """Make self.dir empty: stop and wipe a cluster left there, refuse anything else."""
        if not os.path.isdir(self.dir):
            os.makedirs(self.dir)
            return
        if not os.listdir(self.dir):
            return
        if not self._is_ours():
            raise CephError("%s is not empty and holds no test cluster: refusing to wipe it"
                            % self.dir)
        self.stop(keep=True)
        for entry in os.listdir(self.dir):
            path = os.path.join(self.dir, entry)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("start", help="start a cluster in DIR, print its client env as JSON")
    p.add_argument("dir")
    p.add_argument("--addr", default="127.0.0.1", help="IP the daemons bind to")
    p.add_argument("--suite", help="run Ceph from a root of this Debian suite (e.g. trixie)")
    p = sub.add_parser("stop", help="kill the cluster's daemons and remove DIR")
    p.add_argument("dir")
    p.add_argument("--keep", action="store_true", help="keep DIR (logs) after stopping")
    p = sub.add_parser("status", help="print the daemons' pids and the cluster health")
    p.add_argument("dir")
    p = sub.add_parser("restart-mon", help="stop the mon, start it again, wait until it answers")
    p.add_argument("dir")
    p.add_argument("--down", type=float, default=0.0, help="seconds to leave it stopped")
    args = ap.parse_args(argv)

    c = TestCluster(args.dir, **({"addr": args.addr, "suite": args.suite}
                                 if args.cmd == "start" else {}))
    try:
        if args.cmd == "start":
            c.stop_at_exit = False
            c.start()
            info = c.client_env()
            info.update(mon_addrs=c.mon_addrs, start_seconds=round(c.start_seconds, 3),
                        pids=c.running(), version=c.version())
            print(json.dumps(info, indent=1))
        elif args.cmd == "stop":
            c.stop(keep=args.keep)
        elif args.cmd == "restart-mon":
            c.kill_mon()
            time.sleep(args.down)
            c.start_mon()
            print(json.dumps({"pids": c.running()}))
        else:
            pids = c.running()
            info = {"dir": c.dir, "pids": pids}
            if pids.get("mon." + MON_ID):
                try:
                    st = c.ceph("status", timeout=15)
                    info["health"] = st["health"]["status"]
                    info["osdmap"] = st["osdmap"]
                    info["pgmap"] = {k: st["pgmap"].get(k)
                                     for k in ("pgs_by_state", "num_pgs", "num_pools")}
                except CephError as e:
                    info["error"] = str(e)
            print(json.dumps(info, indent=1))
            return 0 if pids and all(pids.values()) else 1
    except CephError as e:
        print("testcluster: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
