"""The access policy, exhaustively: requested × existing × same/other VM × state."""

import itertools

import pytest

from block_rbd import policy
from block_rbd.errors import AccessDenied, AccessRefused
from block_rbd.policy import ALIVE, PENDING, STALE, Registration

MODES = ("r", "w", "r!", "w!")
VM_A = "11111111-1111-1111-1111-111111111111"
VM_B = "22222222-2222-2222-2222-222222222222"
# Who holds the image, seen from a request of VM_A on host h1:
WHO = ("other-vm",     # VM_B on h2
       "same-host",    # VM_A on h1 (pygrub's handover, a same-host migration)
       "incoming",     # VM_A on h2, the request is an incoming live migration
       "elsewhere")    # VM_A on h2, the request is not a migration (a fixed uuid started twice)


def decide(*args, host="h1", **kwargs):
    """policy.decide for a request on host h1 unless a test says otherwise."""
    return policy.decide(*args, host=host, **kwargs)


def reg(mode, vm=VM_B, host="h2", holder="backend/vbd/7/51712", state=ALIVE, client="10.0.0.2:0/7",
        domid="7", since=1700000000):
    return Registration(host=host, holder=holder, mode=mode, vm=vm, domid=domid, devid="51712",
                        client=client, since=since, state=state)


def expected_grant(requested, existing, who):
    if requested.endswith("!") or who in ("same-host", "incoming"):
        return True
    if requested == "w":
        return False
    return existing not in ("w", "w!")


@pytest.mark.parametrize("requested,existing,who,state",
                         list(itertools.product(MODES, MODES, WHO, (ALIVE, PENDING, STALE))))
def test_matrix(requested, existing, who, state):
    vm = VM_B if who == "other-vm" else VM_A
    existing_reg = reg(existing, vm=vm, host="h1" if who == "same-host" else "h2", state=state)
    if expected_grant(requested, existing, who):
        decision = decide("rbd/img", requested, VM_A, [existing_reg], incoming=who == "incoming")
        assert decision.fence == ()
    else:
        with pytest.raises(AccessDenied) as info:
            decide("rbd/img", requested, VM_A, [existing_reg])
        message = str(info.value)
        assert "\n" not in message and message.startswith("rbd/img: %s refused" % requested)
        for part in ("h2", vm, "domid 7", "devid 51712", "10.0.0.2:0/7", "2023-11-14T22:13:20Z"):
            assert part in message
        assert ("the same VM on another host, and this domain is not an incoming live migration"
                in message) == (who == "elsewhere")
        if state == STALE:
            assert "block-rbd break-lock rbd/img h2:backend/vbd/7/51712" in message


@pytest.mark.parametrize("requested,existing", list(itertools.product(MODES, MODES)))
def test_stale_conflict_is_fenced_under_fence(requested, existing):
    stale = reg(existing, state=STALE)
    decision = decide("rbd/img", requested, VM_A, [stale], stale="fence")
    if expected_grant(requested, existing, "other-vm") and not requested.endswith("!"):
        assert decision.fence == ()  # not in conflict: left alone
    elif requested.endswith("!"):
        assert decision.fence == ()  # forced modes never touch others
    else:
        assert decision.fence == (stale,)


def test_live_conflict_wins_over_stale_one_under_fence():
    with pytest.raises(AccessDenied, match="attached w by VM %s" % VM_B):
        decide("rbd/img", "w", VM_A, [reg("r", state=STALE, vm="x"), reg("w")], stale="fence")


def test_refusal_names_the_oldest_live_holder():
    regs = [reg("r", vm="late", since=1700000500, host="h3"), reg("r", vm="early", since=1700000000)]
    with pytest.raises(AccessDenied, match="VM early"):
        decide("rbd/img", "w", VM_A, regs)


@pytest.mark.parametrize("requested", MODES)
def test_foreign_watchers_refuse_only_w(requested):
    if requested == "w":
        with pytest.raises(AccessDenied, match="watched by client 1.2.3.4:0/9 outside block-rbd"):
            decide("rbd/img", requested, VM_A, [], foreign_watchers=["1.2.3.4:0/9"])
    else:
        decide("rbd/img", requested, VM_A, [], foreign_watchers=["1.2.3.4:0/9"])


@pytest.mark.parametrize("requested", MODES)
def test_foreign_lock_owner_refuses_r(requested):
    if requested == "r":
        with pytest.raises(AccessDenied, match="owns the exclusive lock"):
            decide("rbd/img", requested, VM_A, [], foreign_lock_owners=["1.2.3.4:0/9"])
    else:
        decide("rbd/img", requested, VM_A, [], foreign_lock_owners=["1.2.3.4:0/9"])


def test_foreign_watcher_refuses_w_before_anything_is_fenced():
    with pytest.raises(AccessDenied, match="outside block-rbd"):
        decide("rbd/img", "w", VM_A, [reg("w", state=STALE)], foreign_watchers=["9.9.9.9:0/1"],
               stale="fence")


def test_empty_image_grants_every_mode():
    for mode in MODES:
        assert decide("rbd/img", mode, VM_A, []).fence == ()


def test_bad_mode():
    with pytest.raises(ValueError):
        decide("rbd/img", "rw", VM_A, [])


def test_identity_dom0_is_per_host():
    assert policy.identity("h1", policy.DOM0_UUID, "0") == "dom0@h1"
    assert policy.identity("h1", VM_A, "0") == "dom0@h1"
    assert policy.identity("h1", None, None) == "dom0@h1"
    assert policy.identity("h1", VM_A, "5") == VM_A
    assert policy.identity("h1", VM_A, "5") == policy.identity("h2", VM_A, "9")  # migration
    assert policy.identity("h1", None, None) != policy.identity("h2", None, None)


def test_dom0_of_two_hosts_conflict():
    other_dom0 = reg("w", vm=policy.DOM0_UUID, domid="0", host="h2")
    with pytest.raises(AccessDenied, match="w by dom0"):
        decide("rbd/img", "w", policy.identity("h1", policy.DOM0_UUID, "0"), [other_dom0], incoming=True)


def test_same_vm_on_another_host_only_as_an_incoming_migration():
    source = reg("w", vm=VM_A, host="src")
    decide("rbd/img", "w", VM_A, [source], incoming=True)
    with pytest.raises(AccessDenied, match="not an incoming live migration"):
        decide("rbd/img", "w", VM_A, [source])
    # the incoming flag makes only the same VM the requester's own: another VM still refuses
    with pytest.raises(AccessDenied, match="attached w by VM %s" % VM_B):
        decide("rbd/img", "w", VM_A, [source, reg("w", host="h3")], incoming=True)


def test_same_vm_of_a_stale_host_is_fenced_not_shared():
    # an HA restart after a host died: its stale registration is fenced, not inherited
    dead = reg("w", vm=VM_A, host="h2", state=STALE)
    assert decide("rbd/img", "w", VM_A, [dead], stale="fence").fence == (dead,)
    with pytest.raises(AccessDenied, match="stale attachment .*the same VM on another host"):
        decide("rbd/img", "w", VM_A, [dead])


def test_state_of():
    r = reg("w", client="a:0/1", since=100)
    assert policy.state_of(r, ["a:0/1"], 1000, 40) == ALIVE
    assert policy.state_of(r, ["b:0/2"], 1000, 40) == STALE
    p = reg("w", client=None, since=100)
    assert policy.state_of(p, [], 130, 40) == PENDING
    assert policy.state_of(p, [], 141, 40) == STALE


def test_foreign():
    regs = [reg("w", client="a:0/1"), reg("r", client=None)]
    assert policy.foreign(["a:0/1", "b:0/2", "me:0/3"], regs, own={"me:0/3"}) == ["b:0/2"]


def test_conflicts_table():
    table = {(q, e): policy.conflicts(q, e) for q in MODES for e in MODES}
    assert table == {
        ("r", "r"): False, ("r", "w"): True, ("r", "r!"): False, ("r", "w!"): True,
        ("w", "r"): True, ("w", "w"): True, ("w", "r!"): True, ("w", "w!"): True,
        ("r!", "r"): False, ("r!", "w"): False, ("r!", "r!"): False, ("r!", "w!"): False,
        ("w!", "r"): False, ("w!", "w"): False, ("w!", "r!"): False, ("w!", "w!"): False,
    }


def test_record_roundtrip_and_key():
    r = reg("w!")
    assert r.key == "h2:backend/vbd/7/51712"
    assert Registration(**r.as_record()).as_record() == r.as_record()


# ---- with_state and local_leftovers ---------------------------------------------------------------

def test_with_state_fills_in_the_state_and_keeps_everything_else():
    alive = reg("w", client="a:0/1", since=100, state=STALE)  # whatever state it came with
    stale = reg("r", client="b:0/2", since=100)
    pending = reg("w", client=None, since=990)
    late = reg("w", client=None, since=900)
    watchers = ["a:0/1"]
    assert policy.with_state(alive, watchers, 1000, 40) == Registration(**dict(alive.as_record(), state=ALIVE))
    assert policy.with_state(stale, watchers, 1000, 40).state == STALE
    assert policy.with_state(pending, watchers, 1000, 40).state == PENDING
    assert policy.with_state(late, watchers, 1000, 40).state == STALE
    for r in (alive, stale, pending, late):
        assert policy.with_state(r, watchers, 1000, 40).as_record() == r.as_record()
    assert alive.state == STALE  # the original is left as it was (frozen)


HERE = "h1"


def test_local_leftovers():
    mine_dead = reg("w", host=HERE, holder="backend/vbd/5/51712", client="a:0/1", state=STALE)
    mine_pending = reg("r", host=HERE, holder="backend/vbd/6/51712", client=None, state=PENDING)
    mine_alive = reg("w", host=HERE, holder="backend/vbd/7/51712", client="a:0/3", state=ALIVE)
    mine_known = reg("w", host=HERE, holder="manual", client="a:0/4", state=STALE)
    other_host = reg("w", host="h2", holder="backend/vbd/5/51712", state=STALE)
    regs = [mine_dead, mine_pending, mine_alive, mine_known, other_host]
    assert policy.local_leftovers(regs, HERE, {"manual", "backend/vbd/9/51712"}) == [mine_dead, mine_pending]
    # a holder this host still knows is never a leftover, whatever its state
    assert policy.local_leftovers(regs, HERE, {"manual", "backend/vbd/5/51712", "backend/vbd/6/51712"}) == []
    # another host's registrations are never this host's to drop
    assert policy.local_leftovers(regs, "h3", set()) == []
    assert policy.local_leftovers(regs, "h2", set()) == [other_host]
    assert policy.local_leftovers([], HERE, set()) == []



# ---- attack: what another VM's guest reads in hotplug-error --------------------------
# hotplug-error is in the backend directory, which the frontend can read: a refusal's
# `public` form names the holder's host and domid, never its VM uuid or client address.

@pytest.mark.parametrize("state", [ALIVE, PENDING, STALE])
@pytest.mark.parametrize("requested", ["r", "w"])
def test_a_refusal_shows_the_guest_no_uuid_and_no_client(requested, state):
    with pytest.raises(AccessRefused) as info:
        decide("rbd/img", requested, VM_A, [reg("w", state=state)])
    full, public = str(info.value), info.value.public
    assert VM_B in full and "10.0.0.2:0/7" in full  # the log and the operator still get it all
    for secret in (VM_B, "10.0.0.2", "client 1", "client (mapping)"):
        assert secret not in public
    assert "\n" not in public
    assert public.startswith("rbd/img: %s refused: %s w by a VM (host h2, domid 7, devid 51712, "
                             "since 2023-11-14T22:13:20Z)" % (requested, "stale attachment" if state == STALE
                                                              else "attached"))
    if state == STALE:
        assert public.endswith("if host h2 is really down, fence it: "
                               "block-rbd break-lock rbd/img h2:backend/vbd/7/51712")


def test_a_refusal_by_a_dom0_holder_says_dom0():
    with pytest.raises(AccessRefused) as info:
        decide("rbd/img", "w", VM_A, [reg("w", vm=None, domid="0", holder="manual")])
    assert info.value.public == "rbd/img: w refused: attached w by dom0 (host h2, domid 0, devid 51712, " \
                                "since 2023-11-14T22:13:20Z)"


def test_refusals_for_clients_outside_block_rbd_do_not_show_their_addresses():
    with pytest.raises(AccessRefused) as info:
        decide("rbd/img", "w", VM_A, [], foreign_watchers=["10.9.9.9:0/1", "10.9.9.8:0/2"])
    assert "10.9.9.9:0/1" in str(info.value)
    assert info.value.public == "rbd/img: w refused: watched by 2 clients outside block-rbd"
    with pytest.raises(AccessRefused) as info:
        decide("rbd/img", "r", VM_A, [], foreign_lock_owners=["10.9.9.9:0/1"])
    assert info.value.public == "rbd/img: r refused: a client outside block-rbd owns the exclusive lock"


def test_an_image_name_with_a_percent_sign_is_shown_as_it_is():
    with pytest.raises(AccessRefused) as info:
        decide("rbd/img%s%d", "w", VM_A, [reg("w")])
    assert info.value.public.startswith("rbd/img%s%d: w refused: attached w by a VM")
