"""Cluster-wide access modes: the pure decision over what the registry says.

    w    granted only if no other attachment exists, in any mode
    r    granted only if no other attachment writes (w or w!)
    w!   never refused (cluster filesystems); registers, so later w/r see it
    r!   never refused (forensic reads); registers likewise

"Other" means another VM (VM uuid), on any host.  dom0's own attachments
(frontend-id 0, pygrub, `block-rbd map`) are identified by host, because every
dom0 has the same all-zero VM uuid.  The same VM on another host is "other"
too, unless the requesting domain is an incoming live migration: a fixed
`uuid=` started on two hosts (an HA manager's split brain) is two writers.
Clients outside block-rbd count too: `w` is refused while the image has
foreign watchers, `r` while a foreign client owns the image's exclusive lock.

No I/O here: the registry gathers the facts, this module decides.
"""

import time
from dataclasses import dataclass, field
from typing import Optional, Tuple

from .errors import AccessRefused
from .target import MODES

DOM0_UUID = "00000000-0000-0000-0000-000000000000"

# A registration's liveness, from the image's watchers.
ALIVE = "alive"      # its mapping client watches the image
PENDING = "pending"  # registered, mapping not finished yet (no client address yet)
STALE = "stale"      # its client no longer watches the image: crashed host or mapper


def identity(host, vm, domid):
    """Who "the same VM" is: the VM uuid, or dom0 of one host."""
    if not vm or vm == DOM0_UUID or str(domid) == "0":
        return "dom0@%s" % host
    return vm


def writes(mode):
    return mode in ("w", "w!")


def conflicts(requested, existing):
    """Whether an `existing` registration of another VM refuses `requested`."""
    if requested.endswith("!"):
        return False
    if requested == "w":
        return True
    return writes(existing)


@dataclass(frozen=True)
class Request:
    """Who asks to attach: the holder (a backend path, or "manual") and its guest."""

    holder: str
    mode: str
    vm: Optional[str] = None
    domid: Optional[str] = None
    devid: Optional[str] = None
    incoming: bool = False  # the domain is `xl migrate-receive`'s NAME--incoming


@dataclass(frozen=True)
class Registration:
    """One attachment recorded in Ceph (key = host:holder, unique cluster-wide)."""

    host: str
    holder: str
    mode: str
    vm: Optional[str] = None
    domid: Optional[str] = None
    devid: Optional[str] = None
    client: Optional[str] = None
    since: float = 0.0
    state: str = ALIVE

    @property
    def key(self):
        return holder_key(self.host, self.holder)

    @property
    def identity(self):
        return identity(self.host, self.vm, self.domid)

    def as_record(self):
        return {"host": self.host, "holder": self.holder, "mode": self.mode, "vm": self.vm,
                "domid": self.domid, "devid": self.devid, "client": self.client, "since": self.since}

    def describe(self, public=False):
        """One line naming the holder, for refusals and `block-rbd locks`.  public: what
        another guest may read (hotplug-error): its host and domid, not its VM uuid or
        Ceph client address."""
        dom0 = self.identity.startswith("dom0@")
        vm = "dom0" if dom0 else "a VM" if public else "VM %s" % self.vm
        client = "" if public else ", client %s" % (self.client or "(mapping)")
        return "%s by %s (host %s, domid %s, devid %s%s, since %s)" % (
            self.mode, vm, self.host, self.domid if self.domid is not None else "-",
            self.devid if self.devid is not None else "-", client,
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)))


def holder_key(host, holder):
    return "%s:%s" % (host, holder)


@dataclass(frozen=True)
class Decision:
    fence: Tuple[Registration, ...] = field(default_factory=tuple)  # stale ones to blocklist and drop


def fence_command(target, registration):
    """The exact command an operator runs to fence a stale holder."""
    return "block-rbd break-lock %s %s" % (target, registration.key)


def itself(registration, ident, host, incoming):
    """Whether `registration` is the requester's own VM: on this host (pygrub's handover,
    a same-host migration) or, for an incoming migration, on the host it comes from."""
    return registration.identity == ident and (registration.host == host or incoming)


def _why(registration, ident):
    """What a refusal adds when the holder is the requester's own VM on another host."""
    if registration.identity != ident:
        return ""
    return ("; the same VM on another host, and this domain is not an incoming live migration "
            "(the same VM started on two hosts?)")


def decide(target, mode, ident, registrations, *, host, incoming=False, foreign_watchers=(),
           foreign_lock_owners=(), stale="refuse"):
    """Grant (a Decision) or raise AccessRefused in one line naming the holder (its
    `public` form without the holder's VM uuid and client addresses, for the guest).

    target: the image, for messages.  ident: identity() of the requester, on `host`;
    incoming: the requester is an incoming live migration.
    registrations: every Registration of the image (with its state).
    foreign_watchers / foreign_lock_owners: client addresses outside block-rbd.
    stale: "refuse" or "fence" (what to do about a stale conflicting holder).
    """
    if mode not in MODES:
        raise ValueError("mode %r" % mode)
    if mode.endswith("!"):
        return Decision()
    others = [r for r in registrations if not itself(r, ident, host, incoming) and conflicts(mode, r.mode)]
    live = sorted((r for r in others if r.state != STALE), key=lambda r: (r.since, r.key))
    if live:
        raise _refused(lambda holder: "%s: %s refused: attached %s%s" % (target, mode, holder, _why(live[0], ident)),
                       live[0])
    if mode == "w" and foreign_watchers:
        raise AccessRefused("%s: w refused: watched by client %s outside block-rbd"
                            % (target, ", ".join(sorted(foreign_watchers))),
                            "%s: w refused: watched by %s outside block-rbd" % (target, _clients(foreign_watchers)))
    if mode == "r" and foreign_lock_owners:
        raise AccessRefused("%s: r refused: client %s outside block-rbd owns the exclusive lock"
                            % (target, ", ".join(sorted(foreign_lock_owners))),
                            "%s: r refused: %s outside block-rbd owns the exclusive lock"
                            % (target, _clients(foreign_lock_owners)))
    dead = tuple(sorted(others, key=lambda r: (r.since, r.key)))
    if dead and stale != "fence":
        first = dead[0]
        raise _refused(lambda holder: "%s: %s refused: stale attachment %s%s; its client no longer watches the "
                       "image; if host %s is really down, fence it: %s"
                       % (target, mode, holder, _why(first, ident), first.host, fence_command(target, first)),
                       first)
    return Decision(fence=dead)


def _refused(line, registration):
    """AccessRefused of line(the holder described), in full and in public."""
    return AccessRefused(line(registration.describe()), line(registration.describe(public=True)))


def _clients(addresses):
    """How a public refusal counts clients it does not name."""
    return "a client" if len(set(addresses)) == 1 else "%d clients" % len(set(addresses))


def state_of(registration, watchers, now, grace):
    """ALIVE / PENDING / STALE from the image's watcher addresses.

    A registration without a client address is an add still mapping: alive
    for `grace` seconds (the hotplug budget), stale after.
    """
    if registration.client:
        return ALIVE if registration.client in watchers else STALE
    return PENDING if now - registration.since < grace else STALE


def with_state(registration, watchers, now, grace):
    """The registration with its state_of() filled in."""
    return Registration(**dict(registration.as_record(), state=state_of(registration, watchers, now, grace)))


def local_leftovers(registrations, host, local_holders):
    """Registrations of `host` that no local holder accounts for and no client keeps alive.

    What a run killed (or a remove without the cluster) left behind on this
    host: this host's to drop, never a reason to refuse itself or to fence.
    """
    return [r for r in registrations
            if r.host == host and r.holder not in local_holders and r.state != ALIVE]


def foreign(addresses, registrations, own=()):
    """Addresses that are neither a registered mapping client nor ours."""
    known = {r.client for r in registrations if r.client} | set(own)
    return sorted(set(addresses) - known)
