"""The libxl contract in block_rbd/hotplug.py, in-process against the xenstored
double with the real xenstore tools; Ceph is kept out (mocked) so every branch
that must not reach the cluster is shown not to."""

import os
import re
import stat
import time

import pytest

from block_rbd import attachments, hotplug, mappers, process
from block_rbd import config as config_mod
from block_rbd.cluster import Cluster
from block_rbd.policy import Request
from block_rbd.mappers.base import Mapping
from block_rbd.target import ImageSpec
from block_rbd import xenstore as xs_mod
from block_rbd.errors import AccessRefused, BlockRbdError, XenstoreError
from block_rbd.xenstore import Xenstore

PATH = "backend/vbd/5/51712"
FULL = "/local/domain/0/" + PATH


@pytest.fixture
def setup(tmp_path, monkeypatch, xenstored):
    """A config with a private log file, and a backend directory as libxl writes it."""
    log = tmp_path / "xen-hotplug.log"
    cfg = tmp_path / "block-rbd.yaml"
    cfg.write_text("pool: rbd\nmapper: fuse\nhost: testhost\nstate_dir: %s\nledger_dir: %s\n"
                   "log: {file: %s, syslog: false}\ntimeouts: {hotplug: 20}\n"
                   % (tmp_path / "state", tmp_path / "ledger", log))
    monkeypatch.setenv("BLOCK_RBD_CONFIG", str(cfg))
    for key, value in (("params", "rbd:vm1"), ("mode", "w"), ("frontend-id", "5")):
        xenstored.write("%s/%s" % (FULL, key), value)
    xenstored.write("/local/domain/5/vm", "/vm/0b7b4ea0-1f53-4d1e-9a8e-4c5d6e7f8091")

    class Setup:
        pass
    s = Setup()
    s.log, s.cfg, s.xs = log, cfg, xenstored
    return s


@pytest.fixture
def no_ceph(mocker):
    """Fail the test if anything reaches for the cluster (a connection is made lazily, on first use)."""
    return mocker.patch.object(Cluster, "_connect", side_effect=AssertionError("the cluster was contacted"))


def run(command, path=PATH):
    return hotplug.main(command, {"XENBUS_PATH": path, "PATH": os.environ["PATH"]} if path else {"PATH": "/bin"})


def publishing(mapping):
    """An attach double that publishes `mapping` the way attach does, last."""
    def attach(config, cluster, target, request, registry, publish=None, failing=None):
        publish(mapping)
        return mapping
    return attach


def keys(xenstored):
    return {k[len(FULL) + 1:]: v for k, v in xenstored.tree(FULL).items() if k != FULL}


def test_usage(capsys):
    assert hotplug.main("attach", {"XENBUS_PATH": PATH}) == 1
    assert hotplug.main("add", {}) == 1
    assert "usage: XENBUS_PATH=backend/vbd/DOMID/DEVID block-rbd add|remove" in capsys.readouterr().err


def test_add_when_physical_device_is_written_is_a_no_op(setup, no_ceph):
    setup.xs.write(FULL + "/physical-device", "7:0")
    setup.xs.write(FULL + "/physical-device-path", "/dev/loop0")
    before = keys(setup.xs)
    assert run("add") == 0
    assert keys(setup.xs) == before
    assert "already connected to /dev/loop0; nothing to do" in setup.log.read_text()


@pytest.mark.parametrize("params, fault", [
    (None, "add failed: no params in backend/vbd/5/51712: is this a block-rbd disk?"),
    ("rbd:vm 1", "add failed: image name 'vm 1' contains ' ', which is not allowed"),
    ("rbd:vm1,mapper=floppy", "add failed: mapper=floppy: expected one of krbd, nbd, fuse"),
])
def test_add_with_a_bad_target_never_reaches_ceph(setup, no_ceph, capsys, params, fault):
    if params is None:
        setup.xs.rm(FULL + "/params")
    else:
        setup.xs.write(FULL + "/params", params)
    assert run("add") == 1
    got = keys(setup.xs)
    assert got["hotplug-error"] == fault
    assert got["hotplug-status"] == "error"
    assert "physical-device" not in got
    assert fault in setup.log.read_text()
    assert fault in capsys.readouterr().err


def test_add_with_a_bad_libxl_mode(setup, no_ceph):
    setup.xs.write(FULL + "/mode", "x")
    assert run("add") == 1
    assert keys(setup.xs)["hotplug-error"] == "add failed: libxl mode 'x': expected r or w"


def test_bad_config_is_reported_in_xenstore(setup, no_ceph, capsys):
    setup.cfg.write_text("mapper: floppy\n")
    assert run("add") == 1
    error = keys(setup.xs)["hotplug-error"]
    assert error == "add failed: %s: mapper = 'floppy': expected auto, krbd, nbd or fuse" % setup.cfg
    assert error in capsys.readouterr().err


def test_internal_error_is_still_one_line(setup, mocker, capsys):
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    mocker.patch.object(attachments, "attach", side_effect=RuntimeError("boom\nsecond line"))
    assert run("add") == 1
    assert keys(setup.xs)["hotplug-error"] == "add failed: internal error: RuntimeError: boom second line"
    assert keys(setup.xs)["hotplug-status"] == "error"


def test_add_gives_up_within_the_hotplug_budget(setup, mocker):
    """A step that would outlast the budget (4 s here) is cut where the budget ends, not at a fixed step
    timeout: it gets what the steps before it left (all but the start-up, here; less under emulation)."""
    setup.cfg.write_text(setup.cfg.read_text().replace("hotplug: 20", "hotplug: 4"))
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    mocker.patch.object(attachments, "attach", side_effect=lambda *a, **k: process.run(["sleep", "30"]))
    started = time.monotonic()
    assert run("add") == 1
    assert time.monotonic() - started < 6
    error = keys(setup.xs)["hotplug-error"]
    assert re.fullmatch(r"add failed: sleep 30 timed out after ([0-9.]+) s \(the run's time budget\)", error), error
    assert 0 < float(re.search(r"after ([0-9.]+) s", error).group(1)) <= 4


def test_add_writes_the_contract_keys(setup, mocker, tmp_path):
    node = str(tmp_path / "dev-xvdb")
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(259, 17))
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    attach = mocker.patch.object(attachments, "attach", side_effect=publishing(
        Mapping("fuse", ImageSpec("rbd", "vm1"), False, node)))
    assert run("add") == 0
    got = keys(setup.xs)
    assert got["physical-device"] == "103:11"       # hex major:minor, as blkback parses it
    assert got["physical-device-path"] == node
    assert got["block-rbd-image"] == "rbd/vm1"
    assert got["block-rbd-mode"] == "w"
    assert got["block-rbd-mapper"] == "fuse"
    assert got["hotplug-status"] == "connected"
    assert "hotplug-error" not in got
    # rbd-fuse implements no fallocate: a loop device on it offers discards that all fail
    assert got["discard-enable"] == "0"
    _config, _cluster, target, request = attach.call_args.args[:4]
    assert target.spec == ImageSpec("rbd", "vm1")
    assert request == Request(holder=PATH, mode="w", vm="0b7b4ea0-1f53-4d1e-9a8e-4c5d6e7f8091", domid="5",
                              devid="51712")


@pytest.mark.parametrize("name,incoming", [("web1--incoming", True), ("web1", False),
                                           ("web1--migratedaway", False), (None, False)])
def test_an_incoming_migration_is_told_by_the_domain_name(setup, mocker, tmp_path, name, incoming):
    node = str(tmp_path / "dev")
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(43, 0))
    if name:
        setup.xs.write("/local/domain/5/name", name)
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    attach = mocker.patch.object(attachments, "attach", side_effect=publishing(
        Mapping("krbd", ImageSpec("rbd", "vm1"), False, node)))
    assert run("add") == 0
    assert attach.call_args.args[3].incoming is incoming


def test_dom0s_own_attach_reads_no_domain_facts(setup, mocker, tmp_path):
    node = str(tmp_path / "dev")
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(43, 0))
    setup.xs.write(FULL + "/frontend-id", "0")
    setup.xs.write("/local/domain/0/name", "Domain-0--incoming")
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    attach = mocker.patch.object(attachments, "attach", side_effect=publishing(
        Mapping("krbd", ImageSpec("rbd", "vm1"), False, node)))
    assert run("add") == 0
    assert attach.call_args.args[3] == Request(holder=PATH, mode="w", vm=None, domid="0", devid="51712")


@pytest.mark.parametrize("mapper", ["krbd", "nbd"])
def test_a_writable_krbd_or_nbd_disk_keeps_libxls_discard_setting(setup, mocker, tmp_path, mapper):
    node = str(tmp_path / "dev")
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(43, 0))
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    mocker.patch.object(attachments, "attach", side_effect=publishing(
        Mapping(mapper, ImageSpec("rbd", "vm1"), False, node)))
    assert run("add") == 0
    assert "discard-enable" not in keys(setup.xs)  # libxl's own setting stands


def test_target_mode_overrides_libxl_mode(setup, mocker, tmp_path):
    node = str(tmp_path / "dev")
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 3))
    setup.xs.write(FULL + "/params", "rbd/vm1,mode=r!")
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    attach = mocker.patch.object(attachments, "attach", side_effect=publishing(
        Mapping("fuse", ImageSpec("rbd", "vm1"), True, node)))
    assert run("add") == 0
    assert attach.call_args.args[3].mode == "r!"
    assert keys(setup.xs)["block-rbd-mode"] == "r!"
    assert keys(setup.xs)["physical-device"] == "7:3"
    # libxl wrote discard-enable=1 for its `w` disk; a read-only mapping offers no discard
    assert keys(setup.xs)["discard-enable"] == "0"


def test_failed_connect_write_detaches(setup, mocker, tmp_path):
    """The backend write is attach's last step: its failure is undone with the rest, in one place."""
    node = str(tmp_path / "dev")
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 3))
    mocker.patch.object(Cluster, "check_image")
    registry = mocker.patch.object(hotplug, "Registry").return_value
    mapper = mocker.MagicMock()
    mapper.name = "fuse"
    mapper.map.return_value = Mapping("fuse", ImageSpec("rbd", "vm1"), False, node)
    mapper.find.return_value = mapper.map.return_value
    mocker.patch.object(mappers, "choose", return_value=mapper)
    mocker.patch.object(mappers, "get", return_value=mapper)
    mocker.patch.object(hotplug.Backend, "connected", side_effect=XenstoreError("xenstore-write failed"))
    assert run("add") == 1
    assert keys(setup.xs)["hotplug-error"] == "add failed: xenstore-write failed"
    mapper.unmap.assert_called_once_with(mapper.map.return_value)
    assert registry.release.call_args.args[1:] == (ImageSpec("rbd", "vm1"), PATH)
    assert attachments.local_state(config_mod.load()).records() == []
    assert attachments.local_state(config_mod.load()).pending() == []


def test_a_failure_is_in_xenstore_before_the_partial_attach_is_undone(setup, mocker, tmp_path):
    """Undoing can be slow on an overloaded dom0: libxl's kill must find the failure reported."""
    node = str(tmp_path / "dev")
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 3))
    mocker.patch.object(Cluster, "check_image")
    mocker.patch.object(hotplug, "Registry")
    mapper = mocker.MagicMock()
    mapper.name = "fuse"
    mapper.map.return_value = Mapping("fuse", ImageSpec("rbd", "vm1"), False, node)
    mapper.find.return_value = mapper.map.return_value
    seen = []
    mapper.unmap.side_effect = lambda mapping: seen.append(dict(keys(setup.xs)))
    mocker.patch.object(mappers, "choose", return_value=mapper)
    mocker.patch.object(mappers, "get", return_value=mapper)
    mocker.patch.object(hotplug.Backend, "connected", side_effect=XenstoreError("xenstore-write failed"))
    assert run("add") == 1
    assert len(seen) == 1
    assert seen[0]["hotplug-status"] == "error"
    assert seen[0]["hotplug-error"] == "add failed: xenstore-write failed"
    assert setup.log.read_text().count("add failed:") == 1


def test_a_run_still_going_after_its_budget_is_reported_and_can_no_longer_connect(setup, mocker, tmp_path):
    """A step that overruns (here: one that ignores the budget) cannot keep libxl without a
    report: the watchdog writes it a second after the budget, and the late attach is undone."""
    setup.cfg.write_text(setup.cfg.read_text().replace("hotplug: 20", "hotplug: 1"))
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    node = str(tmp_path / "dev")
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 3))
    seen = {}

    def slow_attach(config, cluster, target, request, registry, publish=None, failing=None):
        deadline_at = time.monotonic() + 10
        while "hotplug-status" not in keys(setup.xs) and time.monotonic() < deadline_at:
            time.sleep(0.05)
        seen["reported"] = dict(keys(setup.xs))
        try:
            publish(Mapping("fuse", ImageSpec("rbd", "vm1"), False, node))
        except Exception as exc:
            failing(exc)
            seen["refused"] = str(exc)
            raise

    mocker.patch.object(attachments, "attach", side_effect=slow_attach)
    reported = []
    assert hotplug.run("add", PATH, on_reported=reported.append) == 1
    assert seen["reported"]["hotplug-status"] == "error"
    assert seen["reported"]["hotplug-error"] == (
        "add failed: not finished when its 1 s budget (timeouts.hotplug) ran out: dom0 is overloaded or a "
        "step hung (see the log)")
    assert "could connect" in seen["refused"]
    assert "physical-device" not in keys(setup.xs)
    assert keys(setup.xs)["hotplug-error"] == seen["reported"]["hotplug-error"]
    assert reported == [1]
    assert setup.log.read_text().count("add failed:") == 1


def test_the_watchdog_leaves_a_late_starting_run_to_report_its_spent_budget_itself():
    # started 100.0; budget 30: a second after the budget
    assert hotplug._watchdog_delay(30, 100.0, 100.2) == pytest.approx(30.8)
    # a run that begins with its 2 s budget spent: its own check names the step; the watchdog
    # waits WATCHDOG_GRACE rather than firing at once
    assert hotplug._watchdog_delay(2, 100.0, 103.0) == pytest.approx(hotplug.WATCHDOG_GRACE)
    # never so late that the report misses libxl
    assert hotplug._watchdog_delay(35, 100.0, 133.5) == pytest.approx(0.5)
    assert hotplug._watchdog_delay(35, 100.0, 136.0) == 0.0


def test_a_run_that_ends_in_time_has_no_watchdog_report(setup, mocker, tmp_path):
    node = str(tmp_path / "dev-xvdb")
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(259, 17))
    setup.cfg.write_text(setup.cfg.read_text().replace("hotplug: 20", "hotplug: 1"))
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    mocker.patch.object(attachments, "attach", side_effect=publishing(
        Mapping("fuse", ImageSpec("rbd", "vm1"), False, node)))
    assert run("add") == 0
    time.sleep(2.5)  # past when the watchdog would have fired
    assert keys(setup.xs)["hotplug-status"] == "connected"
    assert "hotplug-error" not in keys(setup.xs)


def test_remove_after_add_never_ran_with_a_bad_target_does_nothing(setup, no_ceph):
    setup.xs.write(FULL + "/params", "rbd:vm 1")
    assert run("remove") == 0
    assert "hotplug-error" not in keys(setup.xs)
    assert "nothing was mapped" in setup.log.read_text()


def test_remove_uses_the_private_keys_before_params(setup, mocker):
    setup.xs.write(FULL + "/block-rbd-image", "rbd/tenant/vm1")
    setup.xs.write(FULL + "/block-rbd-mode", "r")
    setup.xs.write(FULL + "/params", "something:else")
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    detach = mocker.patch.object(attachments, "detach", return_value="unmapped /dev/loop0")
    assert run("remove") == 0
    assert detach.call_args.args[2:5] == (ImageSpec("rbd", "vm1", "tenant"), True, PATH)


def test_remove_after_a_killed_add_uses_params(setup, mocker):
    setup.xs.write(FULL + "/params", "rbd/vm1,mode=r")
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    detach = mocker.patch.object(attachments, "detach", return_value="nothing to do")
    assert run("remove") == 0
    assert detach.call_args.args[2:5] == (ImageSpec("rbd", "vm1"), True, PATH)


def test_backend_vm_uuid(xenstored):
    backend = hotplug.Backend(Xenstore(), PATH + "/")
    assert backend.path == PATH and backend.devid == "51712"
    assert backend.vm_uuid("9") is None
    xenstored.write("/local/domain/9/vm", "/vm/abc")
    assert backend.vm_uuid("9") == "abc"


# ---- attack: a failure too long for xenstore, a daemon that answers nonsense ----------------------

@pytest.mark.parametrize("char", ["x", "\u00e9", "\u2603"], ids=["ascii", "2-byte", "3-byte"])
def test_attack_a_10_kb_error_arrives_cut_and_the_status_is_still_written(setup, mocker, char):
    """A refusal listing many holders, past xenstore's 4096 bytes: xenstored dropped the
    connection, and neither hotplug-error nor hotplug-status=error was written."""
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    refusal = "refused: held by " + ", ".join("backend/vbd/%d/51712 (%s)" % (i, char * 4) for i in range(400))
    assert len(refusal.encode()) > 10000
    mocker.patch.object(attachments, "attach", side_effect=BlockRbdError(refusal))
    assert run("add") == 1
    got = keys(setup.xs)
    assert got["hotplug-status"] == "error"
    error = got["hotplug-error"]
    assert error.endswith("\u2026") and ("add failed: " + refusal).startswith(error[:-1])
    assert 4096 - 4 < len(PATH) + 1 + len("/hotplug-error") + len(error.encode()) <= 4096
    assert ("add failed: " + refusal) in setup.log.read_text()  # the log has it whole


def test_attack_a_transaction_id_that_is_no_number_fails_the_run_in_one_line(setup, mocker):
    """A non-numeric transaction id escaped as ValueError: a traceback, no exit code, no line."""
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    mocker.patch.object(attachments, "attach", side_effect=BlockRbdError("the image is busy"))
    real = Xenstore._request

    def request(self, mtype, payload, tx=0, what="xenstore"):
        if mtype == xs_mod.XS_TRANSACTION_START:
            real(self, mtype, payload, tx, what)
            return b"garbage\0"
        return real(self, mtype, payload, tx, what)
    mocker.patch.object(Xenstore, "_request", request)
    assert run("add") == 1
    logged = setup.log.read_text()
    assert "add failed: the image is busy" in logged
    assert ("could not report the failure in xenstore: xenstore transaction start: the daemon answered "
            "'garbage', not a transaction id") in logged
    assert "Traceback" not in logged


def test_attack_the_guest_reads_no_other_vms_uuid_or_client_in_a_refusal(setup, mocker):
    """A refusal carried the holder's VM uuid and Ceph client address into hotplug-error,
    which the frontend (the refused guest) can read; the log and stderr keep them."""
    mocker.patch.object(hotplug, "Cluster")
    mocker.patch.object(hotplug, "Registry")
    full = ("rbd/vm1: w refused: attached w by VM 0db9c7fb-caa4-4814-bce6-4701cf0e0222 (host xen-a, "
            "domid 1, devid 51712, client 10.250.250.2:0/1633987285, since 2026-12-07T22:51:09Z)")
    public = "rbd/vm1: w refused: attached w by a VM (host xen-a, domid 1, devid 51712, since 2026-12-07T22:51:09Z)"
    mocker.patch.object(attachments, "attach", side_effect=AccessRefused(full, public))
    assert run("add") == 1
    got = keys(setup.xs)
    assert got["hotplug-error"] == "add failed: " + public and got["hotplug-status"] == "error"
    assert setup.log.read_text().count("add failed: " + full) == 1
