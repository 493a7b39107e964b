"""The subprocess seam (block_rbd/process.py): argv only, bounded, logged, no secrets."""

import logging
import os
import sys
import time

import pytest

from block_rbd import deadline, process
from block_rbd.errors import CommandError, HotplugTimeout

SECRET = "AQBzyd1kAAAAABAAb0XHjGgA3o4P6BXgFgYqLg=="  # the shape of a cephx key


def test_runs_argv_and_captures_output():
    result = process.run([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"],
                         timeout=10)
    assert result.ok and result.returncode == 0
    assert result.stdout == "out\n" and result.stderr == "err\n"


def test_arguments_are_never_interpreted_by_a_shell(tmp_path):
    marker = tmp_path / "pwned"
    result = process.run(["echo", "$(touch %s); `touch %s` | true" % (marker, marker)], timeout=10)
    assert result.stdout == "$(touch %s); `touch %s` | true\n" % (marker, marker)
    assert not marker.exists()


def test_non_string_arguments_are_converted():
    assert process.run(["echo", 1, 2.5], timeout=10).stdout == "1 2.5\n"


def test_failure_names_the_command_and_the_tools_last_line():
    with pytest.raises(CommandError) as info:
        process.run([sys.executable, "-c", "import sys; sys.stderr.write('first\\nthe cause\\n\\n'); sys.exit(3)"],
                    timeout=10)
    assert str(info.value).endswith("failed: the cause")
    assert info.value.returncode == 3
    assert "first" in info.value.stderr


def test_failure_without_stderr_falls_back_to_stdout_then_exit_code():
    with pytest.raises(CommandError, match="failed: on stdout$"):
        process.run([sys.executable, "-c", "print('on stdout'); raise SystemExit(1)"], timeout=10)
    with pytest.raises(CommandError, match="failed: exit code 4$"):
        process.run([sys.executable, "-c", "raise SystemExit(4)"], timeout=10)


def test_check_false_returns_the_failure():
    result = process.run(["false"], timeout=10, check=False)
    assert result.returncode == 1 and not result.ok


def test_missing_tool():
    with pytest.raises(CommandError, match="no-such-tool-xyz: No such file or directory") as info:
        process.run(["no-such-tool-xyz"], timeout=10)
    assert info.value.returncode is None


def test_timeout_kills_and_is_bounded():
    started = time.monotonic()
    with pytest.raises(CommandError, match="timed out after 1 s"):
        process.run(["sleep", "30"], timeout=1)
    assert time.monotonic() - started < 5


def test_timeout_names_the_cap():
    with pytest.raises(CommandError, match=r"^sleep 30 timed out after 1 s \(its cap\)$"):
        process.run(["sleep", "30"], timeout=1)


def test_a_run_inside_a_budget_is_killed_when_the_budget_ends(tmp_path):
    pidfile = tmp_path / "pid"
    code = "import os, time; open(%r, 'w').write(str(os.getpid())); time.sleep(30)" % str(pidfile)
    started = time.monotonic()
    with deadline.budget(deadline.Deadline(1.0)):
        with pytest.raises(CommandError) as info:
            process.run([sys.executable, "-c", code])  # no cap of its own: the budget bounds it
    assert time.monotonic() - started < 5
    assert str(info.value) == "%s -c timed out after 1 s (the run's time budget)" % sys.executable
    assert info.value.returncode is None
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(int(pidfile.read_text()), 0)


def test_a_cap_larger_than_what_is_left_yields_to_the_budget():
    with deadline.budget(deadline.Deadline(1.0)):
        with pytest.raises(CommandError, match=r"timed out after 1 s \(the run's time budget\)$"):
            process.run(["sleep", "30"], timeout=20)


def test_a_cap_smaller_than_the_budget_still_applies():
    started = time.monotonic()
    with deadline.budget(deadline.Deadline(30)):
        with pytest.raises(CommandError, match=r"^sleep 30 timed out after 1 s \(its cap\)$"):
            process.run(["sleep", "30"], timeout=1)
    assert time.monotonic() - started < 5


def test_with_the_budget_used_up_nothing_is_started(tmp_path):
    marker = tmp_path / "ran"
    with deadline.budget(deadline.Deadline(0)):
        with pytest.raises(HotplugTimeout, match="used up before touch$"):
            process.run(["touch", str(marker)], timeout=10)
    assert not marker.exists()


def test_a_quick_command_inside_a_budget_runs_normally():
    with deadline.budget(deadline.Deadline(10)):
        assert process.run(["echo", "ok"]).stdout == "ok\n"


def test_without_a_budget_or_a_cap_a_command_is_not_cut_short():
    assert process.run(["sleep", "0.3"]).ok


def test_daemon_keeping_stdout_open_does_not_hang(tmp_path):
    """rbd-nbd/rbd-fuse fork daemons that inherit stdout: a pipe would never close."""
    pidfile = tmp_path / "pid"
    code = ("import os, sys, time\n"
            "if os.fork() == 0:\n"
            "    open(%r, 'w').write(str(os.getpid())); time.sleep(30); os._exit(0)\n"
            "print('/dev/loop9')\n") % str(pidfile)
    started = time.monotonic()
    try:
        result = process.run([sys.executable, "-c", code], timeout=10)
        assert result.stdout == "/dev/loop9\n"
        assert time.monotonic() - started < 5
    finally:
        for _ in range(50):
            if pidfile.exists() and pidfile.read_text():
                os.kill(int(pidfile.read_text()), 9)
                break
            time.sleep(0.05)


def test_input_is_fed_on_stdin():
    assert process.run(["cat"], timeout=10, input=SECRET).stdout == SECRET
    # without input, stdin is /dev/null, never the caller's terminal
    assert process.run(["cat"], timeout=10).stdout == ""


@pytest.mark.parametrize("arg", [SECRET, "--key=" + SECRET, "secret=" + SECRET.rstrip("="),
                                 "name=x,secret=%s,ro" % SECRET])
def test_refuses_a_cephx_secret_on_a_command_line(arg, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(CommandError, match="refusing to put a cephx secret on a command line: touch") as info:
        process.run(["touch", str(marker), arg], timeout=10)
    assert SECRET not in str(info.value)
    assert not marker.exists()


def test_logs_one_line_per_command_without_output(caplog):
    with caplog.at_level(logging.DEBUG, logger="block-rbd"):
        process.run(["echo", "hello"], timeout=10)
        process.run(["echo", "quiet"], timeout=10, quiet=True)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert lines[0].startswith("ran (") and lines[0].endswith("rc=0): echo hello")


def test_runs_in_root_directory_with_no_inherited_fds(tmp_path):
    """No lock fd or other descriptor of ours reaches a child (close_fds)."""
    fd = os.open(str(tmp_path), os.O_RDONLY)
    os.set_inheritable(fd, True)
    try:
        result = process.run(["sh", "-c", "pwd; for f in /proc/$$/fd/*; do readlink $f; done"], timeout=10, check=False)
    finally:
        os.close(fd)
    lines = result.stdout.splitlines()
    assert lines[0] == "/"
    assert str(tmp_path) not in lines[1:]


@pytest.mark.parametrize("env, expected", [
    ({"PATH": "/opt/bin"}, "/opt/bin:" + ":".join(process.SYSTEM_PATH)),
    ({}, ":".join(process.SYSTEM_PATH)),
    ({"PATH": "/usr/bin::/x"}, "/usr/bin:/x:" + ":".join(p for p in process.SYSTEM_PATH if p != "/usr/bin")),
])
def test_fix_path(env, expected):
    process.fix_path(env)
    assert env["PATH"] == expected


@pytest.mark.parametrize("text, line", [("", ""), (None, ""), ("a\nb\n\n  ", "b"), ("  only  ", "only")])
def test_last_line_is_the_last_non_empty_line(text, line):
    assert process.last_line(text) == line


# ---- daemons in scope units of their own under systemd ------------------------------------------

def test_without_systemd_a_daemon_runs_as_it_is(tmp_path):
    argv = ["rbd-nbd", "map", "rbd/vm1"]
    assert process.scoped(argv, process.Scope("nbd", "rbd/vm1"), runtime=str(tmp_path / "none")) == argv


def test_under_systemd_a_daemon_gets_a_scope_named_for_its_image(tmp_path):
    (tmp_path / "system").mkdir()
    argv = process.scoped(["rbd-nbd", "map", "rbd/tenant/vm-1.a"], process.Scope("nbd", "rbd/tenant/vm-1.a"),
                          runtime=str(tmp_path / "system"), unique="0123abcd")
    assert argv == ["systemd-run", "--scope", "--quiet", "--collect",
                    "--unit=block-rbd-nbd-rbd-tenant-vm-1.a-0123abcd.scope",
                    "--description=block-rbd: rbd-nbd serving rbd/tenant/vm-1.a to Xen",
                    "--property=After=network-online.target",
                    "--property=Before=xendomains.service shutdown.target",
                    "--", "rbd-nbd", "map", "rbd/tenant/vm-1.a"]


def test_a_scope_name_is_a_valid_unit_name_whatever_the_image_is_called():
    unit = process.Scope("fuse", "rbd/-x y\\z@snap%").unit("ff")
    assert unit == "block-rbd-fuse-rbd--x-y-z-snap-ff.scope"
    assert process.Scope("nbd", "rbd/" + "a" * 300).unit("1").startswith("block-rbd-nbd-rbd-" + "a" * 100)
    assert len(process.Scope("nbd", "rbd/" + "a" * 300).unit("1")) < 256  # systemd's limit


def test_a_scoped_command_is_named_by_the_daemon_in_its_errors(tmp_path, monkeypatch):
    """What runs is systemd-run; what a failure names is the daemon's own command."""
    monkeypatch.setattr(process, "under_systemd", lambda runtime=None: True)
    fake = tmp_path / "systemd-run"
    fake.write_text("#!/bin/sh\necho 'rbd-nbd: the cause' >&2\nexit 4\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (tmp_path, os.environ["PATH"]))
    with pytest.raises(CommandError, match="^rbd-nbd map failed: rbd-nbd: the cause$"):
        process.run(["rbd-nbd", "map", "rbd/vm1"], scope=process.Scope("nbd", "rbd/vm1"), timeout=10)


def test_a_secret_is_refused_before_any_scope_is_made(tmp_path, monkeypatch):
    monkeypatch.setattr(process, "under_systemd", lambda runtime=None: True)
    with pytest.raises(CommandError, match="^refusing to put a cephx secret on a command line: rbd-nbd$"):
        process.run(["rbd-nbd", SECRET], scope=process.Scope("nbd", "rbd/vm1"), timeout=10)
