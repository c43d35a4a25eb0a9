"""Tests for multibot.panes against a real tmux server on a private socket."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import wait_until

from multibot.errors import InvalidId, TmuxError
from multibot.panes import Tmux, _parse_state, clean_title, shell_command

CAT = "echo ready; exec cat"  # stays alive, with a known first line


def tmux_cli(sock: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run tmux directly (not through the code under test) on the test socket."""
    return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, check=False)


def show(sock: str, target: str, fmt: str) -> str:
    return tmux_cli(sock, "display-message", "-p", "-t", target, fmt).stdout.strip()


def window_option(sock: str, target: str, name: str) -> str:
    return tmux_cli(sock, "show-options", "-wv", "-t", target, name).stdout.strip()


@pytest.fixture
def sock() -> Iterator[str]:
    name = f"multibot-test-{uuid.uuid4().hex[:12]}"
    # tmux leaves its socket file behind after kill-server; remove it too.
    socket_file = Path(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}", name)
    try:
        yield name
    finally:
        tmux_cli(name, "kill-server")  # even if the test failed half-way
        socket_file.unlink(missing_ok=True)


@pytest.fixture
def tmux(sock: str) -> Tmux:
    return Tmux(sock, "mb", config_file="/dev/null")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_session_starts_with_master_pane_running_its_command(
    tmux: Tmux, sock: str, tmp_path: Path
) -> None:
    assert not tmux.has_session()
    master = tmux.ensure_session("mb", "echo master-ready; exec cat", cwd=tmp_path)
    assert tmux.has_session()
    wait_until(lambda: "master-ready" in tmux.capture(master))
    assert tmux.list_panes() == [(master, "master", False, tmux.pane_pid(master))]
    assert show(sock, master, "#{window_name} #{pane_current_path}") == f"master {tmp_path}"
    for option, value in [
        ("remain-on-exit", "on"),
        ("allow-rename", "off"),
        ("automatic-rename", "off"),
        ("pane-border-status", "top"),
    ]:
        assert window_option(sock, master, option) == value
    # Calling again returns the existing master pane and starts nothing new.
    assert tmux.ensure_session("mb", "exit 1", title="other") == master
    assert len(tmux.list_panes()) == 1


def test_first_command_that_dies_at_once_leaves_a_dead_pane(tmux: Tmux) -> None:
    # remain-on-exit is set in the same tmux invocation, so the session cannot vanish first.
    # (Its output may be lost: tmux 3.3 can reap a child before reading its last bytes.)
    master = tmux.ensure_session("mb", "exit 3")
    wait_until(lambda: tmux.is_dead(master))
    assert tmux.has_session()
    assert tmux.exit_status(master) == 3
    assert "Pane is dead" in tmux.capture(master)


def test_add_pane_passes_env_cwd_and_title(tmux: Tmux, sock: str, tmp_path: Path) -> None:
    tmux.ensure_session("mb", CAT)
    env = {"FOO": "bar 'baz' $HOME", "MULTIBOT_HOME": str(tmp_path)}
    argv = ["sh", "-c", 'echo "foo=$FOO home=$MULTIBOT_HOME"; pwd; exec cat']
    pane = tmux.add_pane("w1 fix #12", argv, cwd=tmp_path, env=env)
    assert pane.startswith("%")
    wait_until(lambda: f"foo=bar 'baz' $HOME home={tmp_path}" in tmux.capture(pane))
    assert str(tmp_path) in tmux.capture(pane).splitlines()
    assert ("w1 fix #12", False) in [(p.title, p.dead) for p in tmux.list_panes()]
    assert show(sock, pane, "#{pane_title}") == "w1 fix #12"
    assert window_option(sock, pane, "pane-border-status") == "top"
    # What the border shows: the window's pane-border-format expanded for this pane.
    border_format = window_option(sock, pane, "pane-border-format")
    assert "w1 fix #12" in show(sock, pane, border_format)


def test_title_set_by_master_survives_program_escape_sequences(
    tmux: Tmux, sock: str, tmp_path: Path
) -> None:
    tmux.ensure_session("mb", CAT)
    # OSC 2 is how programs (Claude Code among them) retitle their terminal; this one does it
    # once the flag file exists, i.e. after add_pane has set the title.
    flag = tmp_path / "go"
    script = (
        f"while [ ! -e {flag} ]; do sleep 0.02; done; "
        r"printf '\033]2;hijacked\033\\'; exec cat"
    )
    pane = tmux.add_pane("w2", script)
    flag.touch()
    wait_until(lambda: show(sock, pane, "#{pane_title}") == "hijacked")
    assert [p.title for p in tmux.list_panes() if p.pane_id == pane] == ["w2"]
    tmux.set_title(pane, "w2: \x1b[31mred\nline #{pane_pid}")
    titles = {p.pane_id: p.title for p in tmux.list_panes()}
    assert titles[pane] == "w2: [31mred line #{pane_pid}"


def test_titles_are_set_together_and_a_gone_pane_does_not_stop_the_others(tmux: Tmux) -> None:
    tmux.ensure_session("mb", CAT)
    panes = [tmux.add_pane(f"w{i}", CAT) for i in range(3)]
    tmux.kill_pane(panes[1])
    tmux.set_titles({p: f"w{i} · t{i} · #x; kill-server" for i, p in enumerate(panes)})
    titles = {p.pane_id: p.title for p in tmux.list_panes()}
    assert titles[panes[0]] == "w0 · t0 · #x; kill-server"
    assert titles[panes[2]] == "w2 · t2 · #x; kill-server"
    assert panes[1] not in titles


def test_panes_overflow_into_new_worker_windows(sock: str) -> None:
    tmux = Tmux(sock, "mb", max_panes_per_window=2, config_file="/dev/null")
    tmux.ensure_session("mb", CAT)
    status = tmux.add_pane("status", CAT, window_name="master")
    workers = [tmux.add_pane(f"w{i}", CAT) for i in range(5)]
    windows = tmux_cli(sock, "list-windows", "-t", "=mb", "-F", "#{window_name}:#{window_panes}")
    assert windows.stdout.split() == ["master:2", "workers:2", "workers-2:2", "workers-3:1"]
    assert show(sock, status, "#{window_name}") == "master"
    assert show(sock, workers[4], "#{window_name}") == "workers-3"
    assert window_option(sock, workers[4], "remain-on-exit") == "on"
    assert window_option(sock, workers[4], "pane-border-status") == "top"
    # A freed slot is reused before the last window fills up.
    tmux.kill_pane(workers[0])
    again = tmux.add_pane("w5", CAT)
    assert show(sock, again, "#{window_name}") == "workers"
    assert {p.title for p in tmux.list_panes()} == {
        "master",
        "status",
        "w1",
        "w2",
        "w3",
        "w4",
        "w5",
    }


def test_crashed_pane_stays_readable_and_respawns(tmux: Tmux, sock: str, tmp_path: Path) -> None:
    tmux.ensure_session("mb", CAT)
    # Exit only once the output was seen: tmux 3.3 may drop bytes written just before a fast
    # exit (it can handle SIGCHLD before the pty read); here we test that they stay.
    flag = tmp_path / "fail-now"
    pane = tmux.add_pane(
        "w1", f"echo about-to-fail; until [ -e {flag} ]; do sleep 0.02; done; exit 7"
    )
    wait_until(lambda: "about-to-fail" in tmux.capture(pane))
    assert not tmux.is_dead(pane) and tmux.exit_status(pane) is None
    flag.touch()
    wait_until(lambda: tmux.is_dead(pane))
    assert tmux.exit_status(pane) == 7
    assert tmux.pane_pid(pane) is None
    assert "about-to-fail" in tmux.capture(pane)
    assert [(p.dead, p.pid) for p in tmux.list_panes() if p.pane_id == pane] == [(True, None)]
    old_pid = int(show(sock, pane, "#{pane_pid}"))

    tmux.respawn(pane, ["sh", "-c", 'echo "back $FOO"; exec cat'], cwd=tmp_path, env={"FOO": "x"})
    wait_until(lambda: "back x" in tmux.capture(pane))
    new_pid = tmux.pane_pid(pane)
    assert new_pid is not None and new_pid != old_pid and pid_alive(new_pid)
    assert not tmux.is_dead(pane)
    assert tmux.exit_status(pane) is None
    assert [p.title for p in tmux.list_panes() if p.pane_id == pane] == ["w1"]


def test_respawn_kills_a_live_process(tmux: Tmux) -> None:
    tmux.ensure_session("mb", CAT)
    pane = tmux.add_pane("w1", ["cat"])
    first = tmux.pane_pid(pane)
    assert first is not None
    tmux.respawn(pane, ["cat"])
    second = tmux.pane_pid(pane)
    assert second is not None and second != first
    wait_until(lambda: not pid_alive(first))


def test_kill_pane_and_session_and_server(tmux: Tmux, sock: str) -> None:
    master = tmux.ensure_session("mb", CAT)
    pane = tmux.add_pane("w1", CAT)
    tmux.kill_pane(pane)
    assert [p.pane_id for p in tmux.list_panes()] == [master]
    with pytest.raises(TmuxError):
        tmux.is_dead(pane)
    tmux.kill_session()
    assert not tmux.has_session()
    tmux.kill_session()  # gone already: no error
    tmux.ensure_session("mb", CAT)
    tmux.kill_server()
    assert tmux_cli(sock, "ls").returncode != 0
    assert not tmux.has_session()
    tmux.kill_server()  # not running: no error


def test_attach_command_and_default_server_guard() -> None:
    assert Tmux("s1", "mb").attach_command() == [
        "tmux",
        "-L",
        "s1",
        "attach-session",
        "-t",
        "=mb",
    ]
    default = Tmux(None, "mb")
    assert default.attach_command() == ["tmux", "attach-session", "-t", "=mb"]
    with pytest.raises(TmuxError):
        default.kill_server()  # never the user's own server


def test_values_are_validated_before_reaching_tmux(tmux: Tmux, tmp_path: Path) -> None:
    for bad in ["a:b", "a.b", "", "x" * 65, "a b", "a\nb"]:
        with pytest.raises(InvalidId):
            Tmux(None, bad)
    with pytest.raises(InvalidId):
        Tmux("../etc", "ok")
    with pytest.raises(InvalidId):
        tmux.add_pane("w", CAT, env={"BAD-KEY": "1"})
    with pytest.raises(InvalidId):
        tmux.add_pane("w", CAT, window_name="a:b")
    with pytest.raises(InvalidId):
        tmux.set_title("3; kill-server", "w")
    with pytest.raises(InvalidId):
        tmux.add_pane("w", [])
    with pytest.raises(InvalidId):
        tmux.ensure_session("not-mb", CAT)  # bound to session "mb"
    with pytest.raises(TmuxError):
        tmux.add_pane("w", CAT, cwd=tmp_path / "missing")
    assert not tmux.has_session()  # none of the above started a server


def test_pure_helpers() -> None:
    assert clean_title("  a\tb\x00c\x1b]2;x\x07  ") == "a b c ]2;x"
    assert len(clean_title("x" * 500)) == 120
    assert shell_command("echo hi") == ["/bin/sh", "-c", "echo hi"]
    assert shell_command(["echo", "a b"]) == ["/bin/sh", "-c", "exec echo 'a b'"]


def test_pane_state_counts_as_dead_only_once_reaped() -> None:
    assert _parse_state("0\t\t\t42\t7") == (False, 42, None, None)
    assert _parse_state("1\t\t\t42\t7") == (False, 42, None, 7)  # exited, not reaped: nudge 7
    assert _parse_state("1\t3\t\t42\t7") == (True, None, 3, None)
    assert _parse_state("1\t\t9\t42\t7") == (True, None, None, None)


def test_a_worker_restarted_in_a_pane_that_is_gone_gets_a_new_one(
    sock: str, tmp_path: Path
) -> None:
    from multibot.launcher import TmuxLauncher
    from multibot.layout import Home

    (tmp_path / "home").mkdir()
    launcher = TmuxLauncher(Home(tmp_path / "home"), sock, "s")
    launcher.tmux.ensure_session("s", "exec sleep 600")
    where = launcher.where()
    assert where == f"tmux server {launcher.tmux.server_pid()}"
    pane = launcher.start("w1", ["sleep", "600"], {}, "w1")
    launcher.tmux.kill_pane(pane)  # closed by hand, or lost with an earlier server
    again = launcher.restart(pane, ["sh", "-c", "exec sleep 600", "--id", "w1"], {})
    assert again != pane and launcher.alive(again)
    assert launcher.where() == where
