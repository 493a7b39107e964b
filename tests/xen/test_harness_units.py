"""Fast checks of the harness's own pure parts (no QEMU, no root, no network).

The Xen-in-QEMU run itself is `python3 tests/xen/harness.py run` (see README.md)."""

import base64
import gzip
import hashlib
import io
import os
import sys
import tarfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import build_dom0  # noqa: E402
import harness  # noqa: E402
from cpio import CpioWriter, write_tree  # noqa: E402


def read_newc(data):
    """Parse a newc archive back: {name: (mode, bytes)}."""
    out, off = {}, 0
    while True:
        assert data[off:off + 6] == b"070701", off
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[off + 110: off + 110 + namesize - 1].decode()
        off += 110 + namesize
        off += (-off) % 4
        body = data[off: off + size]
        off += size
        off += (-off) % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_cpio_roundtrip(tmp_path):
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_bytes(b"hello\n")
    os.chmod(root / "a" / "b" / "f", 0o755)
    os.symlink("b/f", root / "a" / "link")
    buf = io.BytesIO()
    w = CpioWriter(buf)
    write_tree(w, str(root), "pre")
    w.file("/x/y", b"odd", 0o600)  # parent not declared: the kernel tolerates it
    w.close()
    got = read_newc(buf.getvalue())
    assert got["pre/a/b/f"] == (0o100755, b"hello\n")
    assert got["pre/a/link"] == (0o120777, b"b/f")
    assert got["pre/a"][0] == 0o040755
    assert got["x/y"] == (0o100600, b"odd")


def _archive_lines(files):
    tbuf = io.BytesIO()
    with tarfile.open(fileobj=tbuf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    gz = gzip.compress(tbuf.getvalue())
    b64 = base64.encodebytes(gz).decode().splitlines()
    return [f"BRBD-ARCHIVE-BEGIN {len(gz)} {hashlib.md5(gz).hexdigest()}"] + b64 + [
        "BRBD-ARCHIVE-END"]


def test_parse_serial(tmp_path):
    lines = ["(XEN) boot", "BRBD-STAGE tools-ready 6.02", "noise",
             "BRBD-RESULT dummy-hotplug PASS 2.80 dummy hotplug add/remove ok",
             "BRBD-RESULT krbd FAIL 0.13 rc=1 boom", "BRBD-RESULT x SKIP 0.0"]
    lines += _archive_lines({"./recorded/a.txt": b"a\\b\n\x00"})
    lines += ["BRBD-DONE"]
    text = "\r\n".join(lines) + "\r\n"
    r = harness.parse_serial(text, str(tmp_path))
    assert r["stages"] == {"tools-ready": 6.02}
    assert [(x["name"], x["status"], x["seconds"]) for x in r["results"]] == [
        ("dummy-hotplug", "PASS", 2.8), ("krbd", "FAIL", 0.13), ("x", "SKIP", 0.0)]
    assert r["results"][1]["detail"] == "rc=1 boom"
    assert r["archive_ok"] is True and r["done"] is True
    assert (tmp_path / "recorded" / "a.txt").read_bytes() == b"a\\b\n\x00"


def test_parse_serial_corrupt_archive(tmp_path):
    lines = _archive_lines({"f": b"x" * 1000})
    lines[2] = lines[2][:-4] + "AAAA"
    r = harness.parse_serial("\n".join(lines), str(tmp_path))
    assert r["archive_ok"] is False and r["done"] is False


def test_modinfo_depends_and_usr_path():
    assert build_dom0.usr_path("/lib/x86_64-linux-gnu/libc.so.6") == \
        "/usr/lib/x86_64-linux-gnu/libc.so.6"
    assert build_dom0.usr_path("/lib64/ld-linux-x86-64.so.2") == "/usr/lib64/ld-linux-x86-64.so.2"
    assert build_dom0.usr_path("/usr/bin/rbd") == "/usr/bin/rbd"


def test_shell_quote():
    assert harness.shell_quote("a'b c") == "'a'\\''b c'"


def test_parse_serial_names_a_scenario_that_never_reported(tmp_path):
    lines = ["BRBD-SCENARIO-BEGIN a 10.00", "BRBD-RESULT a PASS 1.00 fine",
             "BRBD-SCENARIO-BEGIN hangs 11.50", "BRBD-STAGE main-end 700.00"]
    r = harness.parse_serial("\n".join(lines), str(tmp_path))
    assert r["begun"] == {"a": 10.0, "hangs": 11.5}
    assert [(x["name"], x["status"]) for x in r["results"]] == [("a", "PASS"), ("hangs", "FAIL")]
    assert "began at dom0 uptime 11.5 s and never reported" in r["results"][1]["detail"]


def test_control_runs_host_actions_and_replies(monkeypatch):
    import socket
    import types

    def listen(_ns, _addr, _port):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        return sock

    def host_action(ctx, action, args):
        if action == "boom":
            raise RuntimeError("no such fault")
        return "did %s %s for %s" % (action, " ".join(args), ctx)

    monkeypatch.setattr(harness, "netns_listen", listen)
    control = harness.Control(types.SimpleNamespace(name="x"),
                              types.SimpleNamespace(host_action=host_action), "ctx")
    replies = []
    for request in (b"osd-pause 20\n", b"boom\n"):
        with socket.create_connection(control.sock.getsockname(), timeout=10) as conn:
            conn.sendall(request)
            replies.append(conn.makefile().readline())
    control.close()
    assert replies == ["ok did osd-pause 20 for ctx\n",
                       "error RuntimeError: no such fault\n"]
    assert [a["request"] for a in control.actions] == ["osd-pause 20", "boom"]
    assert control.actions[0]["reply"].startswith("ok ")


LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dom0", "brbd-lib.sh")


def test_a_hung_scenario_is_killed_reported_and_cleaned_up_after(tmp_path):
    """brbd_scenario (dom0's busybox sh): a scenario past its limit is killed with what it
    started and reported FAIL; a failed one is cleaned up after; the rest still run."""
    import shutil
    import subprocess
    import pytest
    busybox = shutil.which("busybox")
    if not busybox:
        pytest.skip("busybox not installed (Debian package busybox-static; make deps installs it)")
    out = tmp_path / "out"
    lib = tmp_path / "lib.sh"
    with open(LIB) as fh:
        lib.write_text(fh.read().replace("OUT=/brbd/out", "OUT=%s" % out))
    prog = tmp_path / "prog.sh"
    prog.write_text(". %s\n" % lib + r"""
brbd_after_fail() { echo "cleaned up"; }
ok() { echo fine; }
bad() { echo oops; false; echo never; }
hang() { echo hanging; sleep 101 & sleep 102; }
skip() { echo "no such thing here"; exit 77; }
brbd_scenario a ok
brbd_scenario b bad
brbd_scenario -t 1 c hang
brbd_scenario d skip
""")
    p = subprocess.run([busybox, "sh", str(prog)], capture_output=True, text=True, timeout=60)
    results = [line.split(" ", 3) for line in p.stdout.splitlines() if line.startswith("BRBD-RESULT")]
    assert [(r[1], r[2]) for r in results] == [("a", "PASS"), ("b", "FAIL"), ("c", "FAIL"), ("d", "SKIP")]
    by_name = {line.split()[1]: line for line in p.stdout.splitlines() if line.startswith("BRBD-RESULT")}
    assert "rc=1 oops" in by_name["b"]
    assert "hung: still running after 1 s, killed (hanging)" in by_name["c"]
    assert "after b: cleaned up" in p.stdout and "after c: cleaned up" in p.stdout
    assert "after a:" not in p.stdout and "after d:" not in p.stdout
    left = subprocess.run(["pgrep", "-f", "sleep 10[12]"], capture_output=True, text=True).stdout
    assert not left.strip(), "the hung scenario's processes are still running: %s" % left


def test_machines_keep_the_one_host_layout_and_number_the_others(tmp_path):
    (one,) = harness.machines_of(None)
    assert (one.tap, one.addr, one.mac) == ("brbdtap0", harness.DOM0_ADDR, harness.DOM0_MAC)
    assert one.serial(str(tmp_path)) == str(tmp_path / "serial.log")
    assert one.outdir(str(tmp_path)) == str(tmp_path / "out")
    a, b = harness.machines_of(["a", "b"])
    assert (a.tap, a.addr, a.mac) == ("brbdtap0", "10.250.250.2", "52:54:00:fa:fa:02")
    assert (b.tap, b.addr, b.mac) == ("brbdtap1", "10.250.250.3", "52:54:00:fa:fa:03")
    assert b.serial(str(tmp_path)) == str(tmp_path / "serial-b.log")
    assert b.outdir(str(tmp_path)) == str(tmp_path / "out-b")


def test_several_machines_report_together(tmp_path):
    h = harness.Harness.__new__(harness.Harness)
    h.machines = harness.machines_of(["a", "b"])
    h.workdir = str(tmp_path)
    h.drive = [{"name": "from-the-host", "status": "PASS", "seconds": 1.0, "detail": "x"}]
    for m, extra in zip(h.machines, ("BRBD-RESULT early PASS 0.5 fine\n", "")):
        os.makedirs(m.outdir(h.workdir))
        with open(m.serial(h.workdir), "w") as fh:
            fh.write("BRBD-STAGE kernel-up 5.0\n" + extra + "BRBD-DONE\n")
    parsed = h._parse_all({"a": 0, "b": 0})
    assert [r["name"] for r in parsed["results"]] == ["early", "from-the-host"]
    assert parsed["qemu_rc"] == 0 and parsed["done"]
    assert parsed["archive_ok"] is False  # no machine shipped its archive
    assert sorted(parsed["machines"]) == ["a", "b"]
    assert h._parse_all({"a": 0, "b": "timeout"})["qemu_rc"] == {"a": 0, "b": "timeout"}


def test_runs_go_side_by_side_as_far_as_the_cpus_allow(monkeypatch, tmp_path):
    """Two one-machine runs share the two CPUs; a two-machine run has them to itself."""
    import subprocess
    import test_xen
    monkeypatch.setattr(test_xen, "SLOTS", 2)
    seen = []

    class Quick(test_xen.Run):
        def reason_not_run(self):
            return None

        def start(self, workdir):
            busy = [r.label for r in runs if r.proc and r.proc.poll() is None]
            seen.append((self.label, busy))
            self.started = time.time()
            self.proc = subprocess.Popen(["sleep", "0.3"])

        def finish(self):
            self.summary = {"label": self.label}
            self.done.set()

    runs = [Quick("twohost", None, "p1", [], 2), Quick("gate", None, "p1", [], 1),
            Quick("gate", None, "p2", [], 1)]
    scheduler = test_xen.Runs(runs, lambda label: str(tmp_path / label))
    assert scheduler.get("gate", "p2") == {"label": "gate-p2"}
    for r in runs:
        r.done.wait(30)
    assert seen == [("twohost-p1", []), ("gate-p1", []), ("gate-p2", ["gate-p1"])]


# ---------------------------------------------------------------- BOOT = "systemd"
import sysdom0  # noqa: E402


def test_program_files_mirror_the_initrd_layout(tmp_path):
    """A systemd dom0's disk gets a program's files where the initrd modes put them."""
    (tmp_path / "rootfs" / "etc" / "xen").mkdir(parents=True)
    (tmp_path / "rootfs" / "etc" / "xen" / "x.cfg").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a").write_text("a")
    (tmp_path / "main").write_text("#!/bin/sh\n")
    os.chmod(tmp_path / "main", 0o755)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "h.pyc").write_bytes(b"")
    files = harness.program_files(str(tmp_path))
    assert files == {"/brbd/run/main": (b"#!/bin/sh\n", 0o755), "/brbd/run/sub/a": (b"a", 0o644),
                     "/etc/xen/x.cfg": (b"x", 0o644)}
    assert harness.program_files(None) == {}


def test_config_text_is_sh():
    assert harness.config_text({"B": "it's", "A": 1}) == "A='1'\nB='it'\\''s'\n"


def test_machine_identity_addresses_the_agent():
    first, second = harness.machines_of(["a", "b"])
    one = harness.machine_identity(first)
    assert "address 10.250.250.2/24" in one["/etc/network/interfaces"][0].decode()
    assert not any("brbd-agent.service.d" in p for p in one)  # the image's own address
    two = harness.machine_identity(second)
    assert "address 10.250.250.3/24" in two["/etc/network/interfaces"][0].decode()
    dropin = two["/etc/systemd/system/brbd-agent.service.d/address.conf"][0].decode()
    assert "BRBD_IP=10.250.250.3" in dropin and "ExecStart=\n" in dropin
    assert one["/etc/machine-id"] != two["/etc/machine-id"]
    assert len(one["/etc/machine-id"][0].strip()) == 32


def test_systemd_summary_shape():
    m = harness.machines_of(["a"])[0]
    m.disk, m.boots = "/d", [{"n": 1, "rc": 0}, {"n": 2, "rc": -9, "cut": True}, {"n": 3, "rc": 0}]
    res = [{"name": "boot-1", "status": "PASS", "seconds": 1.0, "detail": ""}]
    s = harness.systemd_summary([m], res, None)
    assert s["qemu_rc"] == 0 and s["done"] and s["archive_ok"] and s["boot_fail"] == []
    assert s["results"] == res and s["machines"]["a"]["boots"] == m.boots
    m.boots.append({"n": 4, "rc": "x", "fail": "no agent within 9s"})
    s = harness.systemd_summary([m], res, None)
    assert s["qemu_rc"] == {"a": [0, -9, 0, "x"]} and s["boot_fail"] == ["a: boot 4: no agent within 9s"]
    assert not harness.systemd_summary([m], None, "timeout")["done"]


def test_sysdom0_unit_and_files():
    unit = sysdom0.agent_unit()
    for line in ("WantedBy=multi-user.target", "After=network-online.target",
                 "Wants=network-online.target", "Environment=BRBD_IP=10.250.250.2",
                 "StartLimitIntervalSec=0", "StandardOutput=journal+console"):
        assert line in unit.splitlines()
    files = sysdom0.added_files("bookworm-sysdom0")
    assert files["/etc/fstab"][0] == b"/dev/vda / ext4 errors=remount-ro 0 1\n"
    assert b"Storage=persistent" in files["/etc/systemd/journald.conf.d/brbd.conf"][0]
    assert files["/etc/initramfs-tools/modules"][0].split()[-3:] == [b"virtio_pci", b"virtio_blk", b"ext4"]
    assert files["/etc/systemd/system/multi-user.target.wants/brbd-agent.service"] == (
        "->", "/etc/systemd/system/brbd-agent.service")
    assert not any("policy-rc.d" in p or "block-rbd" in p for p in files)
    assert "auto eth0" in sysdom0.interfaces() and "net.ifnames=0" in harness.SYSTEMD_DOM0_ARGS


def test_sysdom0_put_files(tmp_path):
    sysdom0.put_files(str(tmp_path), {"/a/b": b"x", "/a/c": (b"y", 0o600), "/l": ("->", "/a/b")})
    assert (tmp_path / "a" / "b").read_bytes() == b"x"
    assert os.stat(tmp_path / "a" / "c").st_mode & 0o777 == 0o600
    assert os.readlink(tmp_path / "l") == "/a/b"
    sysdom0.put_files(str(tmp_path), {"/l": b"now a file"})  # a link is replaced, not followed
    assert (tmp_path / "a" / "b").read_bytes() == b"x" and (tmp_path / "l").read_bytes() == b"now a file"


def test_sysdom0_key_follows_the_agent(monkeypatch, tmp_path):
    k = sysdom0.image_key("debian12", "/r")
    assert k == sysdom0.image_key("debian12", "/r") and k != sysdom0.image_key("debian13", "/r")
    agent = tmp_path / "agent"
    agent.write_text("other")
    monkeypatch.setattr(sysdom0, "AGENT", str(agent))
    assert sysdom0.image_key("debian12", "/r") != k


def test_sysboot_counts_boots_without_the_header():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "sysboot_host", os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest", "sysboot", "host.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    listing = ("IDX BOOT ID                          FIRST ENTRY                 LAST ENTRY\n"
               " -1 e8bbc91b18b74c76992f9179d74b409d Mon 2026-12-07 20:47:39 UTC Mon 2026-12-07 20:48:05 UTC\n"
               "  0 0123456789abcdef0123456789abcdef Mon 2026-12-07 20:48:05 UTC Mon 2026-12-07 20:48:10 UTC\n")
    assert mod.count_boots(listing) == 2 and mod.BOOT == "systemd"


# ---------------------------------------------------------------- a dom0 dead in its boot
RECORDED_CRASH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recorded", "serial",
                              "debian13-dom0-int3-crash.log")


def test_early_crash_names_the_first_oops_of_a_crashed_dom0():
    with open(RECORDED_CRASH, "rb") as fh:
        serial = fh.read()
    assert harness.early_crash(serial) == "Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
    assert harness.early_crash(b"BRBD-STAGE kernel-up 6.8\nBRBD-DONE\n") is None
    assert harness.early_crash(b"(XEN) Hardware Dom0 crashed: rebooting\n") == "Hardware Dom0 crashed"


def _fake_qemu(tmp_path, monkeypatch, crashes):
    """A Harness whose QEMU is a script: the first `crashes` boots write the recorded crash
    to the serial log and exit 0 (as QEMU does with -no-reboot), the next one runs the
    program to its end."""
    boots = tmp_path / "boots"
    script = tmp_path / "qemu.py"
    script.write_text(
        "import sys\n"
        f"with open({str(boots)!r}, 'a') as fh: fh.write('x')\n"
        f"n = len(open({str(boots)!r}).read())\n"
        f"crash = open({RECORDED_CRASH!r}).read()\n"
        f"with open(sys.argv[1], 'w') as fh:\n"
        f"    fh.write(crash if n <= {crashes} else 'BRBD-STAGE kernel-up 6.8\\nBRBD-DONE\\n')\n")
    h = harness.Harness.__new__(harness.Harness)
    h.machines = harness.machines_of(None)
    h.workdir = str(tmp_path)
    h.timeout = 60
    h.hooks = None
    h.drive = None
    os.makedirs(h.machines[0].outdir(h.workdir))
    monkeypatch.setattr(h, "_qemu_argv", lambda m, boot, initrd, serial: [
        sys.executable, str(script), serial], raising=False)
    return h, boots


def test_a_dom0_that_crashed_in_its_boot_is_booted_again_once(tmp_path, monkeypatch):
    h, boots = _fake_qemu(tmp_path, monkeypatch, crashes=1)
    assert h._boot({}, {"": None}, None) == {"": 0}
    assert boots.read_text() == "xx"
    parsed = h._parse_all({"": 0})
    assert parsed["done"]
    (crash,) = parsed["early_crashes"]["dom0"]
    assert crash["line"].startswith("Oops: int3")
    assert crash["serial"] == h.machines[0].serial(h.workdir) + ".crash1"
    assert os.path.exists(crash["serial"])


def test_a_dom0_that_crashes_twice_is_left_failed(tmp_path, monkeypatch):
    h, boots = _fake_qemu(tmp_path, monkeypatch, crashes=2)
    assert h._boot({}, {"": None}, None) == {"": 0}
    assert boots.read_text() == "xx"
    parsed = h._parse_all({"": 0})
    assert not parsed["done"] and len(parsed["early_crashes"]["dom0"]) == 1


# ---------------------------------------------------------------- the systemd dom0 gate
def _program_host(name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        name + "_host", os.path.join(os.path.dirname(os.path.abspath(__file__)), "guest", name, "host.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sysgate_reports_every_step_test_xen_expects():
    import re
    import test_xen
    mod = _program_host("sysgate")
    with open(mod.__file__) as fh:
        source = fh.read()
    steps = re.findall(r'step\("([a-z0-9-]+)"', source) + re.findall(r'mark\(parsed, "([a-z0-9-]+)"', source)
    assert mod.BOOT == "systemd" and sorted(steps) == sorted(test_xen.SYSGATE_STEPS)
    assert all("  %s " % s in mod.__doc__ for s in steps)  # each step documented


def test_sysgate_guests_attach_through_block_rbd_with_their_mapper():
    mod = _program_host("sysgate")
    text = mod.guest_config("sd-nbd", "6.12.1", "rbd", ",mapper=nbd")
    ro = mod.guest_config("sd-ro-nbd", "6.12.1", "rbd", ",mapper=nbd", "ro")
    assert "access=ro,script=block-rbd,target=rbd/sd-ro-nbd,mapper=nbd" in ro and "brbd_ro=1" in ro
    assert "'format=raw,vdev=xvda,access=rw,script=block-rbd,target=rbd/sd-nbd,mapper=nbd'" in text
    assert 'kernel = "/boot/vmlinuz-6.12.1"' in text and "brbd_mode=serve brbd_disks=xvda:sd-nbd" in text


def test_sysgate_upgrade_is_the_same_package_with_a_newer_version(tmp_path):
    import shutil
    import subprocess
    if not shutil.which("dpkg-deb"):
        pytest.skip("dpkg-deb not installed (Debian package dpkg)")
    tree = tmp_path / "pkg"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text("Package: block-rbd\nVersion: 0.2.0\nArchitecture: all\n"
                                             "Maintainer: x <x@example.org>\nDescription: t\n")
    (tree / "usr").mkdir()
    (tree / "usr" / "marker").write_text("x")
    deb = tmp_path / "block-rbd_0.2.0_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(tree), str(deb)], check=True,
                   stdout=subprocess.DEVNULL)
    (tmp_path / "work").mkdir()
    old, new, out = _program_host("sysgate").upgrade_deb(str(deb), str(tmp_path / "work"))
    fields = subprocess.run(["dpkg-deb", "-f", out, "Package", "Version"], check=True,
                            stdout=subprocess.PIPE, text=True).stdout
    assert (old, new) == ("0.2.0", "0.2.0+gate1") and fields == "Package: block-rbd\nVersion: 0.2.0+gate1\n"
    listing = subprocess.run(["dpkg-deb", "-c", out], check=True, stdout=subprocess.PIPE, text=True).stdout
    assert "./usr/marker" in listing
