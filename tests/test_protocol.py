"""The protocol: every message type round-trips, unknown fields and bad ids are refused."""

from __future__ import annotations

import json

import pytest

from multibot import protocol as p
from multibot.errors import DecodeError

PAYLOADS = [
    p.TaskAssignment(description="do it", branch="multibot/t1", working_directory="/tmp/w1"),
    p.StatusRequest(),
    p.Terminate(reason="done"),
    p.ContextUpdate(kind="discovery", text="the API is v2"),
    p.StatusUpdate(status="working", progress="half way"),
    p.Question(question="which port?"),
    p.TaskComplete(summary="ok", branch="multibot/t1", commit="abc1"),
    p.ErrorReport(kind="agent", message="boom"),
    p.Answer(answer="8080"),
    p.Broadcast(text="hello all"),
]


@pytest.mark.parametrize("payload", PAYLOADS, ids=lambda x: x.type)
def test_every_message_type_round_trips(payload: p.Payload) -> None:
    m = p.make(payload, sender="w1", recipient="master", task_id="t1", generation=3)
    back = p.decode(p.encode(m))
    assert back == m
    assert back.type == payload.type


def test_every_type_is_in_the_schema() -> None:
    schema = json.dumps(p.json_schema())
    for name in p.MessageType.__args__:  # type: ignore[attr-defined]
        assert f'"{name}"' in schema


def test_ids_sort_by_creation_time() -> None:
    ids = [p.new_message_id() for _ in range(200)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(colour="red"), "colour"),
        (lambda d: d["payload"].update(type="SHOUT"), "payload"),
        (lambda d: d.update(sender="../etc"), "sender"),
        (lambda d: d.update(task_id="t1; rm -rf /"), "task_id"),
        (lambda d: d["payload"].update(extra=1), "extra"),
        (lambda d: d.update(schema_version=99), "schema_version"),
    ],
)
def test_bad_messages_are_refused_with_the_field(change, field) -> None:  # type: ignore[no-untyped-def]
    m = p.make(p.Question(question="q"), sender="w1", recipient="master")
    data = json.loads(p.encode(m))
    change(data)
    with pytest.raises(DecodeError) as err:
        p.decode(json.dumps(data).encode())
    assert field in str(err.value)


def test_branch_and_owned_paths_are_validated() -> None:
    with pytest.raises(ValueError):
        p.TaskAssignment(description="x", branch="a..b", working_directory="/w")
    with pytest.raises(ValueError):
        p.TaskAssignment(description="x", branch="ok", working_directory="/w", owns=["../x"])


def test_oversized_and_garbage_input_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        p.decode(b"{" * (p.MAX_MESSAGE_BYTES + 1))
    with pytest.raises(DecodeError):
        p.decode(b"\xff\xfe not json")


@pytest.mark.parametrize(
    ("field", "value"),
    [("branch", "../../etc"), ("branch", "-x"), ("commit", "--upload-pack=x"), ("commit", "zz")],
)
def test_a_completion_names_a_real_branch_and_commit(field: str, value: str) -> None:
    """Issue 20 item 20: the branch of TASK_COMPLETE was not validated (a bad one crashed
    the master), and a commit that is an option would reach git's command line."""
    good = {"type": "TASK_COMPLETE", "summary": "s", "branch": "multibot/t1", "commit": "ab12cd"}
    p.TaskComplete.model_validate(good)
    with pytest.raises(ValueError, match=field):
        p.TaskComplete.model_validate({**good, field: value})
