#!/usr/bin/python3
"""The main job, end to end, on a throwaway local Ceph cluster.

Starts a real single-node cluster (tools/testcluster.py), creates an image,
attaches it through the hotplug path exactly as libxl would (`block-rbd add`
with XENBUS_PATH), writes and reads data through the device, detaches it
(`block-rbd remove`) and shows through librbd that the data is in Ceph.

In a Xen dom0 it uses the real xenstored; elsewhere (no Xen) it starts the
project's xenstored test double so the real xenstore tools have a daemon.
"""

import os
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools"), os.path.join(ROOT, "tests")]

from testcluster import TestCluster  # noqa: E402

SCRIPT = os.path.join(ROOT, "scripts", "block-rbd")
PATTERN = b"block-rbd demo: this block came from a Xen backend\n"


def step(text):
    print("==> " + text, flush=True)


def in_dom0():
    try:
        with open("/proc/xen/capabilities") as handle:
            return "control_d" in handle.read()
    except OSError:
        return False


def run_hotplug(command, backend, env):
    environ = dict(env, XENBUS_PATH=backend, XENBUS_TYPE="vbd", XENBUS_BASE_PATH="backend")
    started = time.monotonic()
    result = subprocess.run([sys.executable, SCRIPT, command], env=environ, cwd="/",
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    print("    block-rbd %s: exit %d in %.2f s %s" % (command, result.returncode,
                                                      time.monotonic() - started, result.stderr.strip()))
    if result.returncode != 0:
        raise SystemExit("demo failed at %s" % command)


def xs(env, *argv):
    return subprocess.run(list(argv), env=env, check=True, capture_output=True, text=True,
                          timeout=10).stdout


def main():
    work = tempfile.mkdtemp(prefix="block-rbd-demo-")
    env = dict(os.environ)
    cluster = TestCluster(os.path.join(work, "ceph"))
    xenstored = None
    try:
        step("starting a throwaway Ceph cluster (mon, mgr, osd on memstore, cephx, 127.0.0.1)")
        cluster.start()
        step("cluster %s up; client.%s has only 'profile rbd' caps" % (cluster.fsid, cluster.user))

        config = os.path.join(work, "block-rbd.yaml")
        with open(config, "w") as handle:
            handle.write("ceph: {conf: %s, id: %s, keyring: %s}\n" % (cluster.conf, cluster.user,
                                                                     cluster.user_keyring))
            handle.write("pool: %s\nstate_dir: %s\nledger_dir: %s\nfuse: {mount_dir: %s}\n"
                         "log: {file: %s, syslog: false}\n"
                         % (cluster.pool, os.path.join(work, "state"), os.path.join(work, "ledger"),
                            os.path.join(work, "fuse"),
                            os.path.join(work, "xen-hotplug.log")))
        env["BLOCK_RBD_CONFIG"] = config

        import rados
        import rbd
        handle = rados.Rados(conffile=cluster.conf, rados_id=cluster.user,
                             conf={"keyring": cluster.user_keyring})
        handle.connect()
        ioctx = handle.open_ioctx(cluster.pool)
        rbd.RBD().create(ioctx, "vm1", 64 << 20, old_format=False)
        step("created image %s/vm1 (64 MiB)" % cluster.pool)

        if in_dom0():
            step("this is a Xen dom0: using the real xenstored")
        else:
            from xenstored import XenstoredDouble
            xenstored = XenstoredDouble(os.path.join(tempfile.mkdtemp(prefix="xsd"), "sock"))
            xenstored.start()
            env.update(xenstored.env())
            step("no Xen here: the real xenstore tools talk to the project's xenstored double")

        domid, devid = 7, 51728
        backend = "backend/vbd/%d/%d" % (domid, devid)
        xs(env, "xenstore-write", "-R",
           backend + "/params", "%s:vm1" % cluster.pool, backend + "/mode", "w",
           backend + "/frontend-id", str(domid), backend + "/type", "phy", backend + "/dev", "xvdb",
           "/local/domain/%d/vm" % domid, "/vm/" + str(uuid.uuid4()))
        step("libxl's part: %s/params = %s:vm1, mode = w" % (backend, cluster.pool))

        step("block-rbd add (what libxl runs for disk = ['script=block-rbd,vdev=xvdb,target=%s:vm1'])"
             % cluster.pool)
        run_hotplug("add", backend, env)
        keys = xs(env, "xenstore-ls", "-f", backend)
        print("".join("    " + line + "\n" for line in keys.splitlines()))
        device = xs(env, "xenstore-read", backend + "/physical-device-path").strip()

        step("writing a pattern through %s at offset 1 MiB (as the guest would)" % device)
        fd = os.open(device, os.O_RDWR)
        try:
            os.pwrite(fd, PATTERN, 1 << 20)
            os.fsync(fd)
            back = os.pread(fd, len(PATTERN), 1 << 20)
        finally:
            os.close(fd)
        print("    read back through the device: %r" % back)

        step("block-rbd remove (what libxl runs on detach / xl destroy)")
        run_hotplug("remove", backend, env)
        left = subprocess.run([sys.executable, SCRIPT, "showmapped"], env=env, capture_output=True,
                              text=True, timeout=30).stdout
        print("    block-rbd showmapped after remove:\n" + "".join("      " + line + "\n"
                                                                   for line in left.splitlines()))

        with rbd.Image(ioctx, "vm1", read_only=True) as image:
            data = image.read(1 << 20, len(PATTERN))
        ioctx.close()
        handle.shutdown()
        step("read through librbd from Ceph: %r" % data)
        if data != PATTERN:
            raise SystemExit("demo FAILED: the data is not in Ceph")
        step("demo passed: the guest's write is in the Ceph image")
        print("    hotplug log: %s" % os.path.join(work, "xen-hotplug.log"))
    finally:
        if xenstored is not None:
            xenstored.stop()
        cluster.stop()


if __name__ == "__main__":
    main()
