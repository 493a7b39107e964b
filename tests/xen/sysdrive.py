"""What a BOOT = "systemd" program's drive(ctx) does on every step: run a command in a
machine's dom0 through its agent, note it with its output in a log, and turn each step
into one result ({"name", "status", "seconds", "detail"}) however it ends."""

import os
import re
import time


class Failed(Exception):
    """A step's check did not hold: its message is the result's detail."""


def count_boots(listing):
    """Boots in `journalctl --list-boots` output (without its header line)."""
    return sum(1 for line in listing.splitlines() if re.match(r"\s*-?\d+\s+[0-9a-f]{32}", line))


class Driver:
    def __init__(self, ctx, machine, logname):
        self.ctx = ctx
        self.machine = machine
        self.agent = ctx.agent(machine)
        self.results = []
        self.log = open(os.path.join(ctx.workdir, logname), "w")

    def close(self):
        self.log.close()

    def note(self, text):
        self.log.write("[%s] %s\n" % (time.strftime("%H:%M:%S"), text))
        self.log.flush()

    def sh(self, script, timeout=120, ok=True):
        """`sh -c script` in dom0: its output, stripped; Failed on a non-zero exit if ok."""
        r = self.agent.sh(script, timeout)
        self.note("rc=%s %.1fs $ %s\n%s" % (r["rc"], r["secs"], script, r["out"].rstrip()))
        if ok and r["rc"] != 0:
            raise Failed("`%s` failed (rc=%s): %s" % (script[:60], r["rc"], r["out"].strip()[-300:]))
        return r["out"].strip()

    def wait_for(self, what, probe, timeout, every=2.0):
        """probe() until it returns something true; that value, or Failed naming `what`."""
        deadline = time.time() + timeout
        last = None
        while True:
            last = probe()
            if last:
                return last
            if time.time() > deadline:
                raise Failed("%s: not within %d s" % (what, timeout))
            time.sleep(every)

    def power(self, verb, timeout):
        """`systemctl VERB` (reboot or poweroff) in dom0: seconds until QEMU exited, or
        Failed after `timeout`."""
        down = self.ctx.poweroff(self.machine, timeout, verb=verb)
        if down is None:
            raise Failed("QEMU still running %d s after systemctl %s" % (timeout, verb))
        return down

    def step(self, name, func):
        """Run one step; True if it passed."""
        t0 = time.time()
        try:
            status, detail = "PASS", func()
        except Failed as exc:
            status, detail = "FAIL", str(exc)
        except Exception as exc:  # the harness's own trouble: still one result
            status, detail = "FAIL", "%s: %s" % (type(exc).__name__, exc)
        self.note("%s %s %s" % (name, status, detail))
        self.results.append({"name": name, "status": status, "seconds": round(time.time() - t0, 1),
                             "detail": detail})
        return status == "PASS"

    def skip(self, name, why):
        self.note("%s SKIP %s" % (name, why))
        self.results.append({"name": name, "status": "SKIP", "seconds": 0.0, "detail": why})
