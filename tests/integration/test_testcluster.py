"""Smoke test of tools/testcluster.py against a real throwaway Ceph cluster."""

import json
import os
import shutil
import subprocess
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(__file__), "..", "..", "tools")
sys.path.insert(0, TOOLS)
from conftest import new_cluster  # noqa: E402
from testcluster import TestCluster, _pid_alive  # noqa: E402

SCRIPT = os.path.join(TOOLS, "testcluster.py")

pytestmark = pytest.mark.skipif(
    not all(shutil.which(b) for b in ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph-authtool")),
    reason="ceph daemons not installed")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with new_cluster(str(tmp_path_factory.mktemp("ceph"))) as c:
        yield c


def test_least_privilege_user_does_io(cluster):
    env = cluster.client_env()
    assert env["user"] == "blockrbd"
    assert os.stat(env["keyring"]).st_mode & 0o777 == 0o600
    assert "[v2:127.0.0.1:" in env["mon_host"] and ",v1:127.0.0.1:" in env["mon_host"]
    cluster.rados("-p", "rbd", "put", "smoke", env["conf"])
    with open(env["conf"]) as f:
        assert cluster.rados("-p", "rbd", "get", "smoke", "-") == f.read()
    assert cluster.ceph("osd", "pool", "application", "get", "rbd") == {"rbd": {}}


def test_admin_blocklist_and_min_compat(cluster):
    cluster.ceph("osd", "blocklist", "add", "127.0.0.1:0/4242")
    assert "127.0.0.1:0/4242" in [e["addr"] for e in cluster.ceph("osd", "blocklist", "ls")]
    cluster.ceph("osd", "blocklist", "rm", "127.0.0.1:0/4242")
    cluster.ceph("osd", "set-require-min-compat-client", "mimic")
    assert cluster.ceph("osd", "dump")["require_min_compat_client"] == "mimic"


def test_make_user_and_pool(cluster):
    cluster.create_pool("extra")
    keyring = cluster.make_user("dom0b", caps={"mon": "profile rbd",
                                                "osd": "profile rbd pool=extra"})
    assert os.stat(keyring).st_mode & 0o777 == 0o600
    cluster.rados("-p", "extra", "put", "o", keyring, user="dom0b")
    with pytest.raises(Exception, match="Operation not permitted|Permission denied"):
        cluster.rados("-p", "rbd", "put", "o", keyring, user="dom0b")


def test_osd_and_mon_restart_keep_data(cluster):
    cluster.rados("-p", "rbd", "put", "survivor", cluster.conf)
    cluster.kill_osd()
    assert cluster.ceph("osd", "stat")["num_up_osds"] == 0
    assert cluster.running()["osd.0"] is None
    cluster.start_osd()
    assert cluster.rados("-p", "rbd", "stat", "survivor")
    cluster.kill_mon()
    assert cluster.running()["mon.a"] is None
    cluster.start_mon()
    assert cluster.ceph("mon", "stat")["quorum"]


def test_rbd_bindings_as_user(cluster):
    rados = pytest.importorskip("rados")
    rbd = pytest.importorskip("rbd")
    env = cluster.client_env()
    r = rados.Rados(conffile=env["conf"], rados_id=env["user"],
                    conf={"keyring": env["keyring"]})
    r.connect()
    try:
        with r.open_ioctx(env["pool"]) as io:
            rbd.RBD().create(io, "img", 64 << 20)
            with rbd.Image(io, "img") as img:
                img.write(b"x" * 4096, 0)
                assert img.read(0, 4096) == b"x" * 4096
                header = "rbd_header." + img.id()
                io.lock_exclusive(header, "blockrbd", "c1", desc="smoke")
                with pytest.raises(rados.ObjectBusy):
                    io.lock_exclusive(header, "blockrbd", "c2")
                io.unlock(header, "blockrbd", "c1")
                assert len(list(img.watchers_list())) == 1
    finally:
        r.shutdown()


def test_cli_start_status_stop(tmp_path):
    d = str(tmp_path / "cli")
    run = [sys.executable, SCRIPT]
    # capture_output returning at all proves the daemons do not hold our pipes
    p = subprocess.run(run + ["start", d], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    info = json.loads(p.stdout)
    try:
        assert os.path.exists(info["conf"]) and os.path.exists(info["keyring"])
        assert subprocess.run(run + ["status", d], capture_output=True,
                              timeout=60).returncode == 0
    finally:
        p = subprocess.run(run + ["stop", d], capture_output=True, timeout=60)
    assert p.returncode == 0, p.stderr.decode()
    assert not os.path.exists(d)
    assert not any(_pid_alive(pid) for pid in info["pids"].values())
