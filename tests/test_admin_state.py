"""AdminState: run-time token states and fault rules, replayed between workers and nodes.
Changes may arrive twice or out of order (mesh, master, Redis): every copy must end the same."""

from __future__ import annotations

import itertools

import pytest

from rawsse.apns.admin import AdminError, AdminState
from rawsse.config import parse_fault

TOKEN = "746f6b656e31"


def replay_of(state: AdminState, command: dict) -> dict:
    state.apply(command)
    return state.replayable(command)


def snapshot(state: AdminState) -> tuple:
    return (state.describe_tokens(), state.describe_faults())


def test_replayable_commands_carry_the_resulting_state_and_its_stamp():
    origin = AdminState((parse_fault("5%:503"),))
    added = replay_of(origin, {"op": "add_fault", "rule": "1%:429"})
    assert added["op"] == "set_faults" and added["stamp"] == origin.faults_stamp > 0
    assert [r["status"] for r in added["rules"]] == [503, 429]
    token = replay_of(origin, {"op": "set_token", "token": TOKEN, "state": "unregistered"})
    assert token["timestamp"] == origin.token_states[bytes.fromhex(TOKEN)][1]

    copy = AdminState()
    copy.apply(added)
    copy.apply(token)
    assert snapshot(copy) == snapshot(origin)
    copy.apply(added)  # twice: unchanged
    assert snapshot(copy) == snapshot(origin)


def test_fault_shares_survive_the_replay_exactly():
    origin = AdminState()
    replay = replay_of(origin, {"op": "set_faults", "rules": ["33.333333%:429"]})
    copy = AdminState()
    copy.apply(replay)
    assert copy.faults[0].share == pytest.approx(origin.faults[0].share, rel=1e-12)


def test_changes_applied_in_any_order_converge_on_the_newest():
    origin = AdminState()
    changes = [
        replay_of(origin, {"op": "set_token", "token": TOKEN, "state": "unregistered"}),
        replay_of(origin, {"op": "set_faults", "rules": ["50%:500"]}),
        replay_of(origin, {"op": "set_token", "token": TOKEN, "state": "bad"}),
        replay_of(origin, {"op": "clear_tokens"}),
        replay_of(origin, {"op": "set_token", "token": "aa" + TOKEN, "state": "expired"}),
        replay_of(origin, {"op": "clear_faults"}),
    ]
    for order in itertools.permutations(changes):
        copy = AdminState((parse_fault("9%:503"),))
        for change in order:
            copy.apply(change)
        assert snapshot(copy) == snapshot(origin), order


def test_an_operator_change_wins_over_a_replay_stamped_in_the_future():
    local = AdminState()
    local.apply({"op": "set_faults", "rules": ["1%:500"], "stamp": 2 ** 62})
    local.apply({"op": "clear_faults"})  # stamped after what it has seen, whatever the clock
    assert local.faults == [] and local.faults_stamp == 2 ** 62 + 1


def test_an_operator_clear_removes_a_token_state_stamped_in_the_future():
    local = AdminState()
    local.apply({"op": "set_token", "token": TOKEN, "state": "bad", "stamp": 2 ** 62})
    local.apply({"op": "clear_tokens"})
    assert local.token_states == {} and local.tokens_cleared == 2 ** 62 + 1


def test_copies_draw_faults_independently():
    origin = AdminState((parse_fault("50%:503"),))
    first, second = origin.copy(), origin.copy()
    draws = [(first.pick_fault() is None, second.pick_fault() is None) for _ in range(64)]
    assert any(a != b for a, b in draws)


@pytest.mark.parametrize("command, message", [
    ({"op": "set_token", "token": TOKEN, "stamp": -1}, "stamp"),
    ({"op": "set_token", "token": TOKEN, "stamp": "soon"}, "stamp"),
    ({"op": "explode"}, "unknown admin command"),
    (["set_token"], "JSON object"),
])
def test_bad_commands_are_refused_with_a_reason(command, message):
    with pytest.raises(AdminError, match=message):
        AdminState().apply(command)


def auth_of(state: AdminState) -> dict:
    return state.auth.describe()


def test_auth_changes_replay_as_the_whole_state_and_converge_in_any_order():
    origin = AdminState()
    fingerprint = "AB:" * 31 + "AB"
    changes = [
        replay_of(origin, {"op": "update_auth", "revoke_key": "KEYID00001"}),
        replay_of(origin, {"op": "update_auth", "revoke_certificate": fingerprint,
                           "clock_offset": 1260}),
        replay_of(origin, {"op": "clear_auth"}),
        replay_of(origin, {"op": "update_auth", "revoke_keys": ["KEYID00002"]}),
    ]
    assert changes[1]["op"] == "set_auth" and changes[0]["stamp"] < changes[1]["stamp"]
    assert {k: v for k, v in changes[1].items() if k not in ("op", "stamp")} == {
        "revoked_keys": ["KEYID00001"], "revoked_certificates": ["ab" * 32],
        "clock_offset": 1260.0}
    assert auth_of(origin) == {"revoked_keys": ["KEYID00002"], "revoked_certificates": [],
                               "clock_offset": 0.0}
    for order in itertools.permutations(changes):
        copy = AdminState()
        for change in order:
            copy.apply(change)
        assert auth_of(copy) == auth_of(origin), order
    respawned = origin.copy()  # what the master starts a new worker from
    assert auth_of(respawned) == auth_of(origin)


@pytest.mark.parametrize("command, message", [
    ({"op": "update_auth", "revoke_certificate": "abc"}, "SHA-256 fingerprint"),
    ({"op": "update_auth", "revoke_key": ""}, "key id"),
    ({"op": "update_auth", "clock_offset": "1h"}, "clock_offset"),
    ({"op": "update_auth", "clock_offset": float("nan")}, "clock_offset"),
    ({"op": "set_auth", "revoked_keys": "KEYID00001"}, "must be a list"),
])
def test_bad_auth_changes_are_refused_with_a_reason(command, message):
    state = AdminState()
    with pytest.raises(AdminError, match=message):
        state.apply(command)
    assert auth_of(state) == {"revoked_keys": [], "revoked_certificates": [], "clock_offset": 0.0}
