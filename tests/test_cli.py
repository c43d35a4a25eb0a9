"""The command line: each subcommand does its one edit or report, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multibot import auth, mailbox, protocol
from multibot.cli import main
from multibot.layout import Home
from multibot.state import Plan, PlanTask, QuestionRecord, SystemState, WorkerState
from multibot.store import StateFile


@pytest.fixture
def home(tmp_path: Path) -> Home:
    return Home(tmp_path)


def run(home: Home, *args: str) -> int:
    return main(["--home", str(home.root), *args])


def test_schema_writes_every_message_and_state_schema(home: Home, tmp_path: Path) -> None:
    out = tmp_path / "schemas"
    assert run(home, "schema", "--out", str(out)) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "message.schema.json" in names and "system-state.schema.json" in names
    message = json.loads((out / "message.schema.json").read_text())
    assert "TASK_ASSIGNMENT" in json.dumps(message)


def test_state_validate_names_file_line_and_field(home: Home, capsys) -> None:  # type: ignore[no-untyped-def]
    StateFile(home.system_state, SystemState, default=SystemState).update(lambda s: s)
    assert run(home, "state", "validate") == 0
    home.worker_state("w1").parent.mkdir(parents=True, exist_ok=True)
    home.worker_state("w1").write_text('{\n  "id": "w1",\n  "paused": "yes please"\n}\n')
    home.system_state.write_text('{\n  "paused": true,\n}\n')
    assert run(home, "state", "validate") == 1
    out = capsys.readouterr().out
    assert f"{home.system_state}:3:" in out
    assert "w1-state.json" in out and "paused" in out


@pytest.mark.parametrize(
    ("value", "said"),
    [('"yes"', "valid boolean"), ("1", "valid boolean"), ('"on"', "valid boolean")],
)
def test_an_editable_field_of_the_wrong_type_is_refused_not_coerced(
    home: Home, value: str, said: str
) -> None:
    """Issue 20 item 9: "paused": "yes", "on" or 1 was taken as true (pydantic's lax mode),
    and the master then rewrote the person's text."""
    f = StateFile(home.system_state, SystemState, default=SystemState)
    f.update(lambda s: s)
    text = home.system_state.read_text().replace('"paused": false', f'"paused": {value}')
    home.system_state.write_text(text)
    assert f.read().paused is False
    problem = f.problem()
    assert problem is not None and "paused" in str(problem) and said in str(problem)


@pytest.mark.parametrize("version", [10**40, -1])
def test_a_version_out_of_range_is_refused(home: Home, version: int) -> None:
    f = StateFile(home.system_state, SystemState, default=SystemState)
    f.update(lambda s: s)
    data = json.loads(home.system_state.read_text())
    data["version"] = version
    home.system_state.write_text(json.dumps(data))
    f.read()
    assert "version" in str(f.problem())


def test_state_validate_names_forged_ghost_and_missing_task_files(
    home: Home, capsys: pytest.CaptureFixture[str]
) -> None:
    from multibot.state import TaskRecord

    plan = Plan(approved=True, tasks=[PlanTask(id=t, title=t, description=t) for t in "abc"])
    StateFile(home.plan, Plan, default=lambda: plan).update(lambda p: p)
    home.tasks_dir.mkdir(parents=True)
    for t in plan.tasks[:2]:
        rec = TaskRecord(task=t).sealed()
        StateFile(home.task(t.id), TaskRecord, default=lambda r=rec: r).update(lambda r: r)
    data = json.loads(home.task("a").read_text())
    data["status"] = "merged"
    home.task("a").write_text(json.dumps(data))
    data["task"]["id"] = "ghost"
    home.task("ghost").write_text(json.dumps(data))
    assert run(home, "state", "validate") == 1
    out = capsys.readouterr().out
    assert "a.json: a field only multibot writes was changed by hand" in out
    assert "ghost.json: no task of the plan" in out
    assert "c.json: missing" in out
    assert "b.json" not in out


def test_pause_and_resume_edit_the_files(home: Home) -> None:
    StateFile(home.worker_state("w1"), WorkerState, default=lambda: WorkerState(id="w1")).update(
        lambda s: s
    )
    assert run(home, "pause", "w1") == 0
    assert json.loads(home.worker_state("w1").read_text())["paused"] is True
    assert run(home, "resume", "w1") == 0
    assert json.loads(home.worker_state("w1").read_text())["paused"] is False
    assert run(home, "pause", "all") == 0
    assert json.loads(home.system_state.read_text())["paused"] is True
    assert run(home, "pause", "w9") == 2  # no such worker: an error, not a new file
    assert not home.worker_state("w9").exists()


def test_answer_and_approve(home: Home) -> None:
    q = QuestionRecord(id="q-1", message_id="m", worker="w1", question="colour?")
    home.questions_dir.mkdir(parents=True)
    StateFile(home.question("q-1"), QuestionRecord, default=lambda: q).update(lambda r: r)
    assert run(home, "answer", "q-1", "blue") == 0
    assert json.loads(home.question("q-1").read_text())["answer"] == "blue"
    assert run(home, "answer", "q-404", "x") == 2
    assert run(home, "approve") == 2  # no plan yet
    plan = Plan(tasks=[PlanTask(id="a", title="a", description="a")])
    StateFile(home.plan, Plan, default=lambda: plan).update(lambda p: p)
    assert run(home, "approve") == 0
    assert json.loads(home.plan.read_text())["approved"] is True


def test_send_and_inbox(home: Home, capsys) -> None:  # type: ignore[no-untyped-def]
    mailbox.create_inbox(home, "w1")
    assert run(home, "send", "--to", "w1", "--type", "STATUS_REQUEST") == 2  # no run yet
    assert "no run key" in capsys.readouterr().err
    keys = auth.create_keys(home)
    assert (
        run(
            home,
            "send",
            "--to",
            "w1",
            "--type",
            "CONTEXT_UPDATE",
            "--json",
            '{"kind": "note"}',
            "--text",
            "hello",
        )
        == 0
    )
    assert run(home, "send", "--to", "nobody", "--type", "STATUS_REQUEST") == 2
    assert not (home.inboxes_dir / "nobody").exists()
    capsys.readouterr()
    assert run(home, "inbox", "w1", "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["waiting"]) == 1
    # signed from the run key as the master of w1 (generation 0: no state file names one)
    rx = mailbox.Receiver(home, "w1", watch=False)
    (m,) = rx.fetch()
    rx.close()
    assert auth.WorkerKey("w1", 0, keys.worker("w1", 0)).check(m, None) is None


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--to", "../x", "--type", "STATUS_REQUEST"], "recipient: Value error, invalid recipient"),
        (["--to", "w1", "--type", "CONTEXT_UPDATE", "--text", "hi"], "kind: Field required"),
        (["--to", "w1", "--type", "STATUS_REQUEST", "--json", "{oops"], "--json is not valid"),
        (["--to", "w1", "--type", "STATUS_REQUEST", "--json", "[1]"], "must be a JSON object"),
    ],
)
def test_send_refuses_a_bad_message_in_one_line(
    home: Home, capsys: pytest.CaptureFixture[str], args: list[str], said: str
) -> None:
    """Issue 20 item 12: `send --to ../x` printed a raw pydantic traceback."""
    mailbox.create_inbox(home, "w1")
    assert run(home, "send", *args) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and "errors.pydantic.dev" not in err
    assert len(err.strip().splitlines()) == 1


def test_report_needs_a_worker_identity(home: Home, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("MULTIBOT_WORKER_ID", raising=False)
    assert run(home, "report", "progress", "hi") == 2
    assert "MULTIBOT_WORKER_ID" in capsys.readouterr().err


def test_report_goes_to_its_own_worker_signed_for_its_task(home: Home, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    keys = auth.create_keys(home)
    mailbox.create_inbox(home, "w1")
    worker = auth.WorkerKey("w1", 2, keys.worker("w1", 2))
    monkeypatch.setenv("MULTIBOT_WORKER_ID", "w1")
    monkeypatch.setenv("MULTIBOT_TASK_ID", "t1")
    monkeypatch.setenv("MULTIBOT_GENERATION", "2")
    monkeypatch.setenv("MULTIBOT_AGENT_KEY", auth.agent_key(worker.key, "t1").hex())
    assert run(home, "report", "decision", "use", "sqlite") == 0
    assert run(home, "report", "discovery", "the API is v2") == 0
    rx = mailbox.Receiver(home, "w1", watch=False)
    got = rx.fetch()
    rx.close()
    assert [m.payload.kind for m in got] == ["decision", "discovery"]  # type: ignore[union-attr]
    assert all(worker.check(m, "t1") is None for m in got)
    refused = worker.check(got[0], "t2")  # the worker is on another task: not about it
    assert refused is not None and refused.forged
    # An agent's key signs no order, and nothing that passes for the master's.
    forged = auth.sign(
        protocol.make(protocol.Terminate(), sender="master", recipient="w1", task_id="t1"),
        auth.agent_key(worker.key, "t1"),
        2,
        auth.AGENT,
    )
    assert worker.check(forged, "t1") is not None


def test_bad_config_is_a_clear_error(home: Home, capsys) -> None:  # type: ignore[no-untyped-def]
    home.config_dir.mkdir(parents=True)
    home.master_config.write_text('{"max_workers": 0}')
    assert run(home, "master", "--repo", str(home.root), "--plan", "x.json") == 2
    err = capsys.readouterr().err
    assert "master-config.json" in err and "max_workers" in err
