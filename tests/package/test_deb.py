"""The Debian package: `make deb` builds it lintian-clean, and it installs on a plain
Debian 12 and a plain Debian 13 root with dpkg -i + apt-get -f install, as an operator
would install it (roots from tools/debianroot.py; apt's downloads are cached)."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import debianroot  # noqa: E402

sys.path.insert(0, ROOT)
from block_rbd import __version__  # noqa: E402

DEB = os.path.join(ROOT, "dist", "block-rbd_%s_all.deb" % __version__)
# Ceph's bindings come from the suite's own archive: only the mirror can provide them
INSTALL_TIMEOUT = 900

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("dpkg-buildpackage", "dh", "lintian", "debootstrap")),
    reason="debhelper/dh-python/lintian/debootstrap not installed (`make deb-deps`; .ci/run installs them)")


def run(argv, timeout=300, **kw):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def deb():
    built = run(["make", "-s", "-C", ROOT, "deb"], timeout=600)
    assert built.returncode == 0, built.stdout[-3000:]
    return DEB


def fields(deb, *names):
    out = run(["dpkg-deb", "-f", deb] + list(names)).stdout
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


def test_the_package_is_lintian_clean(deb):
    lint = run(["lintian", "--fail-on", "error,warning", deb])
    assert lint.returncode == 0, lint.stdout


def test_the_package_holds_the_script_the_command_and_the_conffile(deb):
    listing = run(["dpkg-deb", "-c", deb]).stdout
    entries = {line.split()[5]: line for line in listing.splitlines()}
    assert "./usr/lib/python3/dist-packages/block_rbd/hotplug.py" in entries
    assert entries["./usr/sbin/block-rbd"].startswith("-rwxr-xr-x")
    assert entries["./etc/xen/scripts/block-rbd"].split()[-3:] == [
        "./etc/xen/scripts/block-rbd", "->", "/usr/sbin/block-rbd"]
    assert "./usr/share/man/man8/block-rbd.8.gz" in entries
    assert "./lib/systemd/system/block-rbd.socket" in entries
    assert "./lib/systemd/system/xendomains.service.d/block-rbd.conf" in entries
    assert entries["./var/lib/block-rbd/"].startswith("drwxr-xr-x")
    ctrl = run(["dpkg-deb", "--ctrl-tarfile", deb])
    assert ctrl.returncode == 0
    conffiles = run(["dpkg-deb", "-I", deb, "conffiles"]).stdout.split()
    assert conffiles == ["/etc/xen/block-rbd.yaml"]
    f = fields(deb, "Depends", "Recommends", "Suggests", "Architecture", "Version")
    depends = [d.strip().split()[0] for d in f["Depends"].split(",")]
    assert {"python3-rados", "python3-rbd", "python3-click", "python3-yaml"} <= set(depends)
    assert f["Recommends"] == "rbd-nbd" and f["Suggests"].startswith("rbd-fuse")
    assert f["Architecture"] == "all" and f["Version"] == __version__


def test_no_unit_lets_guests_daemons_escape_its_lifecycle(deb, tmp_path):
    """The daemons run in scopes of their own: no unit needs KillMode=process, and
    xendomains stops before the network."""
    run(["dpkg-deb", "-x", deb, str(tmp_path)])
    units = tmp_path / "lib/systemd/system"
    for unit in units.iterdir():
        if unit.is_file():
            assert "KillMode" not in unit.read_text(), unit.name
    dropin = (units / "xendomains.service.d/block-rbd.conf").read_text()
    assert "\nAfter=network-online.target remote-fs.target block-rbd.socket" in dropin
    assert "Before=xendomains.service" in (units / "block-rbd-release-pending.service").read_text()


def test_the_upgrade_moves_the_daemons_before_debhelper_restarts_the_units(deb, tmp_path):
    """debhelper's code is in the postinst once, where #DEBHELPER# stands: adopt-daemons
    runs before the units restart (a #DEBHELPER# in a comment once put the whole restart
    before it, and ran every section twice)."""
    run(["dpkg-deb", "-e", deb, str(tmp_path)])
    postinst = (tmp_path / "postinst").read_text()
    assert postinst.count("\tpy3compile -p block-rbd") == 1 and postinst.count("deb-systemd-invoke") == 1
    assert postinst.index("block-rbd adopt-daemons") < postinst.index("deb-systemd-invoke")
    assert postinst.index("set -e") < postinst.index("# Automatically added by")


def test_the_man_page_is_the_command_lines_help(deb, tmp_path):
    run(["dpkg-deb", "-x", deb, str(tmp_path)])
    page = run(["zcat", str(tmp_path / "usr/share/man/man8/block-rbd.8.gz")]).stdout
    for command in ("add", "backup", "break-lock", "doctor", "locks", "resize", "snapshot create"):
        assert '.SS "%s"' % command.replace("-", "\\-") in page


@pytest.mark.parametrize("suite", ["bookworm-plain", "trixie-plain"])
def test_installs_on_a_plain_root_with_dpkg_and_apt(deb, suite, tmp_path):
    root = debianroot.build(suite)
    archives = os.path.join(debianroot.cache_dir(), "apt-archives-" + debianroot.release(suite))
    os.makedirs(os.path.join(archives, "partial"), exist_ok=True)
    shutil.copy(deb, tmp_path / "block-rbd.deb")
    overlay = tmp_path / "overlay"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
           "LC_ALL": "C.UTF-8"}

    def inside(*argv, timeout=300):
        binds = [str(tmp_path / "block-rbd.deb"), archives + ":/var/cache/apt/archives"]
        return run(debianroot.in_root(root, list(argv), binds=binds, overlay=str(overlay)),
                   timeout=timeout, env=env)

    first = inside("dpkg", "-i", str(tmp_path / "block-rbd.deb"))
    assert first.returncode == 1 and "dependency problems" in first.stdout  # as for any .deb
    fixed = inside("apt-get", "-f", "install", "-y", "-q", "--no-install-recommends",
                   timeout=INSTALL_TIMEOUT)
    assert fixed.returncode == 0, fixed.stdout[-3000:]
    status = inside("dpkg-query", "-W", "-f", "${Status} ${Version}", "block-rbd")
    assert status.stdout == "install ok installed %s" % __version__
    for argv in (["block-rbd", "--help"], ["/etc/xen/scripts/block-rbd", "--help"]):
        out = inside(*argv)
        assert out.returncode == 0 and "Ceph RBD images as Xen disks." in out.stdout, out.stdout
    probe = inside("python3", "-c", "import rados, rbd, block_rbd.hotplug; print(rbd.RBD().version())")
    assert probe.returncode == 0, probe.stdout
    assert inside("test", "-f", "/etc/xen/block-rbd.yaml").returncode == 0
    assert inside("test", "-d", "/var/lib/block-rbd").returncode == 0
    purged = inside("apt-get", "purge", "-y", "-q", "block-rbd")
    assert purged.returncode == 0, purged.stdout[-2000:]
    for gone in ("/etc/xen/block-rbd.yaml", "/etc/xen/scripts/block-rbd", "/usr/sbin/block-rbd",
                 "/usr/lib/python3/dist-packages/block_rbd", "/var/lib/block-rbd"):
        assert inside("test", "-e", gone).returncode == 1, gone
