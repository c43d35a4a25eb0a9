"""The git layer against real repositories in a temporary folder (no network, no user config)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import filelock
import pytest

from multibot import checkout, worktrees
from multibot.errors import GitError, InvalidId, LockTimeout, MergeBlocked
from multibot.worktrees import GitRepo, task_id_of

USER = ("-c", "user.name=User", "-c", "user.email=user@example.com")


def git(cwd: Path, *args: str) -> str:
    """Run git as the user would, with an identity of its own; return stdout."""
    done = subprocess.run(
        ["git", *USER, *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"git {args}: {done.stderr}"
    return done.stdout.strip()


@pytest.fixture(autouse=True)
def isolated_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide the person's git config and identity so tests behave the same on every machine."""
    config = tmp_path / "gitconfig"
    config.write_text("")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(config))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("NAME", "EMAIL"):
        for who in ("AUTHOR", "COMMITTER"):
            monkeypatch.delenv(f"GIT_{who}_{var}", raising=False)
    monkeypatch.delenv("EMAIL", raising=False)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A user repository on branch main with one commit and an uncommitted-free checkout."""
    root = tmp_path / "project"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "app.txt").write_text("line one\nline two\n")
    (root / ".gitignore").write_text("*.log\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "initial")
    return root


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home" / "worktrees"


def make(repo: Path, home: Path, **kwargs: object) -> GitRepo:
    gr = GitRepo(repo, home / "_integration", **kwargs)  # type: ignore[arg-type]
    gr.ensure_integration()
    return gr


def snapshot(root: Path) -> tuple[str, str, str, str]:
    """What the user sees: current branch, HEAD, status, and every non-multibot ref."""
    refs = git(root, "for-each-ref", "--format=%(refname) %(objectname)")
    mine = "\n".join(r for r in refs.splitlines() if "refs/heads/multibot/" not in r)
    return (
        git(root, "symbolic-ref", "HEAD"),
        git(root, "rev-parse", "HEAD"),
        git(root, "status", "--porcelain", "--ignored"),
        mine,
    )


def do_task(gr: GitRepo, wt: Path, task_id: str, files: dict[str, str]) -> str:
    gr.start_task(wt, task_id)
    for name, text in files.items():
        (wt / name).write_text(text)
    sha = gr.commit_all(wt, f"work on {task_id}")
    assert sha is not None
    return sha


def test_a_candidate_is_built_in_order_with_conflicts_left_out_and_lands(
    repo: Path, home: Path
) -> None:
    gr = make(repo, home)
    w1, w2, w3 = home / "w1", home / "w2", home / "w3"
    gr.start_task(w1, "empty")  # changes nothing: settled by the one listing call
    do_task(gr, w2, "t1", {"app.txt": "from t1\n"})
    do_task(gr, w3, "t2", {"app.txt": "from t2\n"})  # conflicts with t1, merged first
    tip = git(repo, "rev-parse", "multibot/integration")
    slot = home / "_integration-2"
    c = gr.build(
        slot,
        [
            ("empty", "Nothing", "multibot/empty"),
            ("t1", "One", "multibot/t1"),
            ("t2", "Two", "multibot/t2"),
            ("gone", "Gone", "multibot/gone"),
        ],
    )
    assert c.base == tip and c.commit != tip
    merges = dict(c.merges)
    assert merges["empty"] is None and merges["t1"] == c.commit
    assert {o.task_id: o.status for o in c.conflicts} == {"t2": "conflict", "gone": "missing"}
    assert [x.path for x in c.conflicts[0].conflicts] == ["app.txt"]
    # Built, not landed: the branch moves only when told, and only from the base.
    assert git(repo, "rev-parse", "multibot/integration") == tip
    assert gr.check(slot, "test \"$(cat app.txt)\" = 'from t1'", 10)[0] == 0
    assert gr.land(c.commit, c.base, "t1")
    assert not gr.land(c.commit, c.base, "t1")  # landed already: said so, nothing done
    assert git(repo, "show", "multibot/integration:app.txt") == "from t1"
    log = git(repo, "log", "--format=%s", "multibot/integration")
    assert log.splitlines()[0] == "multibot: merge task t1 (One)"


def test_a_commit_a_person_adds_to_the_integration_branch_is_kept(
    repo: Path, home: Path, tmp_path: Path
) -> None:
    gr = make(repo, home)
    do_task(gr, home / "w1", "t1", {"a.txt": "a\n"})
    assert gr.merge("t1", "A").status == "merged"  # the integration worktree is at t1's merge
    do_task(gr, home / "w1", "t2", {"b.txt": "b\n"})
    # A person commits on multibot/integration from a checkout of their own, then leaves it.
    mine = tmp_path / "mine"
    git(repo, "worktree", "add", "-q", str(mine), "multibot/integration")
    (mine / "person.txt").write_text("mine\n")
    git(mine, "add", "person.txt")
    git(mine, "commit", "-q", "-m", "a person's commit")
    person = git(mine, "rev-parse", "HEAD")
    git(mine, "switch", "-q", "--detach")
    assert gr.merge("t2", "B").status == "merged"
    # The merge was built on the person's commit, not on the worktree's stale HEAD.
    git(repo, "merge-base", "--is-ancestor", person, "multibot/integration")
    assert git(repo, "show", "multibot/integration:person.txt") == "mine"
    # A candidate built before a person's commit does not land over it.
    do_task(gr, home / "w1", "t3", {"c.txt": "c\n"})
    c = gr.build(home / "_integration", [("t3", "C", "multibot/t3")])
    git(mine, "switch", "-q", "multibot/integration")
    (mine / "late.txt").write_text("late\n")
    git(mine, "add", "late.txt")
    git(mine, "commit", "-q", "-m", "another")
    with pytest.raises(MergeBlocked) as moved:
        gr.land(c.commit, c.base, "t3")
    assert moved.value.kind == "moved"
    again = gr.build(home / "_integration", [("t3", "C", "multibot/t3")])
    with pytest.raises(MergeBlocked) as out:  # and a checkout of it holds every landing
        gr.land(again.commit, again.base, "t3")
    assert out.value.kind == "checked-out" and str(mine) in str(out.value)
    git(mine, "switch", "-q", "--detach")
    assert gr.land(again.commit, again.base, "t3")
    assert git(repo, "show", "multibot/integration:late.txt") == "late"


def test_a_stale_index_lock_in_a_scratch_worktree_is_cleared(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    do_task(gr, home / "w1", "t1", {"a.txt": "a\n"})
    slot = home / "_verify-1"
    gr.check_out(slot, "multibot/t1")
    gitdir = Path(git(slot, "rev-parse", "--absolute-git-dir"))
    (gitdir / "index.lock").write_text("")  # a git killed mid-command left it
    notes = gr.check_out(slot, "multibot/integration")
    assert notes and "index.lock" in notes[0]
    assert not (gitdir / "index.lock").exists() and not (slot / "a.txt").exists()
    assert gr.check_out(slot, "multibot/t1") == () and (slot / "a.txt").exists()


def test_tasks_merged_in_dependency_order_and_user_untouched(
    repo: Path, home: Path, tmp_path: Path
) -> None:
    hook_log = tmp_path / "hook.log"
    before = snapshot(repo)
    gr = make(repo, home, setup_hook=f'echo "$PWD" >> "{hook_log}"')
    w1, w2 = home / "w1", home / "w2"

    do_task(gr, w1, "t1", {"a.txt": "from t1\n"})
    do_task(gr, w2, "t2", {"b.txt": "from t2\n"})
    assert gr.changed_files("multibot/t1") == ["a.txt"]
    assert not (w2 / "a.txt").exists()

    first = gr.merge("t1", "Add a", verify_cmd="test -f a.txt")
    assert first.status == "merged" and first.commit is not None
    assert git(repo, "rev-parse", "multibot/integration") == first.commit
    parents = git(repo, "rev-list", "--parents", "-n", "1", first.commit).split()
    assert len(parents) == 3  # --no-ff: a real merge commit even though it could fast-forward
    assert git(repo, "log", "-1", "--format=%s", first.commit) == "multibot: merge task t1 (Add a)"
    assert git(repo, "log", "-1", "--format=%an", first.commit) == "multibot"

    # t3 depends on t1: started after t1's merge, in the reused worktree w1, it sees a.txt.
    assert gr.ensure_worktree(w1) == w1.resolve()  # reused: the hook does not run again
    do_task(gr, w1, "t3", {"c.txt": (w1 / "a.txt").read_text() + "and t3\n"})
    assert gr.merge("t2", "Add b").status == "merged"
    third = gr.merge("t3", "Use a", verify_cmd="test -f a.txt && test -f b.txt")
    assert third.status == "merged"

    tree = git(repo, "ls-tree", "--name-only", "multibot/integration").split()
    assert {"a.txt", "b.txt", "c.txt", "app.txt"} <= set(tree)
    assert git(repo, "show", "multibot/integration:c.txt") == "from t1\nand t3"
    assert all(gr.is_merged(f"multibot/{t}") for t in ("t1", "t2", "t3"))
    assert gr.merge("t1", "Add a").status == "nothing"
    # The set-up hook ran once per new worktree (integration, w1, w2), not on reuse.
    assert len(hook_log.read_text().splitlines()) == 3
    assert snapshot(repo) == before
    assert sorted(gr.task_branches()) == ["multibot/t1", "multibot/t2", "multibot/t3"]


def test_commit_all_takes_untracked_respects_gitignore_and_may_be_empty(
    repo: Path, home: Path
) -> None:
    gr = make(repo, home)
    wt = home / "w1"
    assert gr.start_task(wt, "t1") == "multibot/t1"
    assert gr.commit_all(wt, "nothing yet") is None
    (wt / "new.txt").write_text("x\n")
    (wt / "debug.log").write_text("ignored\n")
    (wt / "app.txt").write_text("changed\n")
    assert gr.has_uncommitted(wt)
    sha = gr.commit_all(wt, "work")
    assert sha == gr.head_commit(wt)
    assert set(gr.changed_files("multibot/t1")) == {"new.txt", "app.txt"}
    assert not gr.has_uncommitted(wt)
    assert (wt / "debug.log").exists()


def test_resumed_task_keeps_its_branch_and_commits(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    sha = do_task(gr, home / "w1", "t1", {"a.txt": "first\n"})
    (home / "w1" / "half.txt").write_text("not committed yet\n")
    assert gr.start_task(home / "w1", "t1") == "multibot/t1"  # same worktree: as left
    assert (home / "w1" / "half.txt").exists()
    with pytest.raises(GitError, match="uncommitted"):
        gr.start_task(home / "w1", "t2")  # would carry t1's half-done work into t2
    gr.cleanup([home / "w1"], force=True)
    assert gr.start_task(home / "w2", "t1") == "multibot/t1"  # another worktree after restart
    assert gr.head_commit(home / "w2") == sha


def test_conflict_is_reported_with_both_sides_and_merge_aborted(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    do_task(gr, home / "w1", "t1", {"app.txt": "line one\nline TWO by t1\n"})
    do_task(gr, home / "w2", "t2", {"app.txt": "line one\nline 2 by t2\n"})
    assert gr.merge("t1", "one").status == "merged"
    tip = git(repo, "rev-parse", "multibot/integration")

    out = gr.merge("t2", "two")
    assert out.status == "conflict" and out.commit is None
    assert [c.path for c in out.conflicts] == ["app.txt"]
    (_, ours, theirs) = out.conflicts[0]
    assert ours == "line one\nline TWO by t1\n"
    assert theirs == "line one\nline 2 by t2\n"
    assert "CONFLICT" in out.output
    integ = home / "_integration"
    assert git(repo, "rev-parse", "multibot/integration") == tip
    assert git(integ, "status", "--porcelain") == ""
    assert not Path(git(integ, "rev-parse", "--absolute-git-dir"), "MERGE_HEAD").exists()
    assert not gr.is_merged("multibot/t2")


def test_failing_verify_is_reverted_with_its_output(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    do_task(gr, home / "w1", "t1", {"a.txt": "x\n"})
    tip = git(repo, "rev-parse", "multibot/integration")
    out = gr.merge("t1", "A", verify_cmd="echo checking; echo 'broken: a.txt' >&2; exit 3")
    assert out.status == "verify_failed" and out.commit is None
    assert "broken: a.txt" in out.output and "exited 3" in out.output
    assert git(repo, "rev-parse", "multibot/integration") == tip
    assert git(home / "_integration", "rev-parse", "HEAD") == tip
    assert not (home / "_integration" / "a.txt").exists()
    assert gr.merge("t1", "A", verify_cmd="grep -q x a.txt").status == "merged"


def test_verify_that_hangs_is_killed(repo: Path, home: Path) -> None:
    gr = make(repo, home, command_timeout=0.5)
    do_task(gr, home / "w1", "t1", {"a.txt": "x\n"})
    out = gr.merge("t1", "A", verify_cmd="sleep 30")
    assert out.status == "verify_failed" and "timed out" in out.output


def test_interrupted_merge_is_recovered(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    do_task(gr, home / "w1", "t1", {"app.txt": "changed by t1\n"})
    do_task(gr, home / "w2", "t2", {"app.txt": "changed by t2\n"})
    assert gr.merge("t1", "one").status == "merged"
    tip = git(repo, "rev-parse", "multibot/integration")
    integ = home / "_integration"
    # A crash in the middle: a conflicted merge left in the integration worktree.
    done = subprocess.run(
        ["git", *USER, "merge", "--no-commit", "multibot/t2"], cwd=integ, capture_output=True
    )
    assert done.returncode != 0

    rec = gr.recover()
    assert rec.interrupted == ("multibot/t2",)
    assert rec and "interrupted merge" in str(rec)
    assert git(integ, "status", "--porcelain") == ""
    assert git(integ, "rev-parse", "HEAD") == tip == git(repo, "rev-parse", "multibot/integration")
    assert not gr.recover()
    assert gr.merge("t2", "two").status == "conflict"  # the queue works again


def test_unverified_merge_left_by_crash_is_dropped(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    do_task(gr, home / "w1", "t1", {"a.txt": "x\n"})
    tip = git(repo, "rev-parse", "multibot/integration")
    integ = home / "_integration"
    # Crash while verifying: the merge commit exists on the detached HEAD only.
    git(integ, "merge", "--no-ff", "--no-edit", "multibot/t1")
    (integ / "junk.txt").write_text("verify left this\n")
    stale = Path(git(integ, "rev-parse", "--absolute-git-dir"), "index.lock")
    stale.write_text("")  # git was killed mid-command
    rec = gr.recover()
    assert rec.interrupted == ("multibot/t1",)
    assert not stale.exists() and "index.lock" in str(rec)
    assert git(integ, "rev-parse", "HEAD") == tip
    assert git(integ, "status", "--porcelain") == ""
    assert gr.merge("t1", "A").status == "merged"


def test_cleanup_keeps_unmerged_and_dirty_work(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    w1, w2, w3 = home / "w1", home / "w2", home / "w3"
    do_task(gr, w1, "t1", {"a.txt": "unmerged\n"})
    do_task(gr, w2, "t2", {"b.txt": "merged\n"})
    do_task(gr, w3, "t3", {"c.txt": "merged\n"})
    assert gr.merge("t2", "b").status == "merged"
    assert gr.merge("t3", "c").status == "merged"
    (w2 / "b.txt").write_text("edited after the merge\n")
    (w3 / "build.log").write_text("ignored files do not count\n")

    refused = gr.cleanup([w1, w2, w3])
    reasons = {r.path: r.reason for r in refused}
    assert set(reasons) == {w1.resolve(), w2.resolve()}
    assert "not merged" in reasons[w1.resolve()]
    assert "uncommitted changes: b.txt" in reasons[w2.resolve()]
    assert w1.exists() and w2.exists() and not w3.exists()

    with pytest.raises(GitError, match="not merged"):
        gr.delete_branch("multibot/t1")
    gr.delete_branch("multibot/t3")
    assert "multibot/t3" not in gr.task_branches()

    assert gr.cleanup([w1, w2], force=True) == []
    assert not w1.exists() and not w2.exists()
    assert not gr.is_merged("multibot/t1")  # the worktree went, its commits did not
    assert "a.txt" in git(repo, "ls-tree", "--name-only", "multibot/t1")


def test_stale_worktree_is_pruned_and_recreated(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    do_task(gr, home / "w1", "t1", {"a.txt": "x\n"})
    subprocess.run(["rm", "-rf", str(home / "w1")], check=True)  # the person deleted it
    assert gr.ensure_worktree(home / "w1").is_dir()
    assert gr.start_task(home / "w1", "t1") == "multibot/t1"
    assert (home / "w1" / "a.txt").read_text() == "x\n"


def test_failing_setup_hook_is_an_error_and_leaves_no_worktree(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    gr.setup_hook = "echo installing; echo 'no network' >&2; exit 7"
    with pytest.raises(GitError, match="no network") as err:
        gr.ensure_worktree(home / "w1")
    assert "exit 7" in str(err.value)
    assert not (home / "w1").exists()
    gr.setup_hook = "true"
    assert gr.ensure_worktree(home / "w1").is_dir()


@pytest.mark.parametrize("bad", ["../evil", "Upper", "-rf", "a b", "t1;rm", "", "_x", "a" * 64])
def test_invalid_task_ids_are_rejected_before_git(repo: Path, home: Path, bad: str) -> None:
    gr = make(repo, home)
    with pytest.raises(InvalidId):
        gr.start_task(home / "w1", bad)
    with pytest.raises(InvalidId):
        gr.merge(bad, "title")
    assert not (home / "w1").exists()
    assert gr.task_branches() == []


@pytest.mark.parametrize("bad", ["a..b", "-x", "x.lock", "x y", "a/../b", "", "x~1", "x:y"])
def test_invalid_branch_names_are_rejected_before_git(repo: Path, home: Path, bad: str) -> None:
    with pytest.raises(InvalidId):
        GitRepo(repo, home / "_integration", integration_branch=bad)
    gr = make(repo, home)
    for call in (gr.is_merged, gr.changed_files, gr.merge_into, gr.delete_branch):
        with pytest.raises(InvalidId):
            call(bad)
    with pytest.raises(InvalidId):
        gr.ensure_integration(base=bad)
    with pytest.raises(InvalidId):
        gr.merge("t1", "t", branch=bad)


def test_task_id_clashing_with_integration_branch(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    with pytest.raises(InvalidId):
        gr.branch_for("integration")
    assert task_id_of("multibot/t7") == "t7" and task_id_of("main") is None


def test_unusable_repositories_give_clear_errors(tmp_path: Path) -> None:
    integ = tmp_path / "wt" / "_integration"
    with pytest.raises(GitError, match="no such folder"):
        GitRepo(tmp_path / "missing", integ)
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(GitError, match=r"plain: not a git repository"):
        GitRepo(plain, integ)
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    with pytest.raises(GitError, match="empty: the repository has no commit"):
        GitRepo(empty, integ)
    (empty / "sub").mkdir()
    with pytest.raises(GitError, match="give its top folder"):
        GitRepo(empty / "sub", integ)


def test_integration_from_chosen_base_never_moves_user_branches(repo: Path, home: Path) -> None:
    first = git(repo, "rev-parse", "HEAD")
    (repo / "app.txt").write_text("newer\n")
    git(repo, "commit", "-q", "-am", "newer")
    gr = GitRepo(repo, home / "_integration")
    with pytest.raises(GitError, match="not a commit"):
        gr.ensure_integration(base="nosuchbranch")
    assert gr.ensure_integration(base=first) == first
    assert gr.ensure_integration() == first  # exists already: left where it is
    assert git(repo, "rev-parse", "main") != first


def test_merge_into_user_branch(repo: Path, home: Path) -> None:
    git(repo, "branch", "release")
    gr = make(repo, home)
    do_task(gr, home / "w1", "t1", {"a.txt": "x\n"})
    assert gr.merge("t1", "A").status == "merged"
    tip = git(repo, "rev-parse", "multibot/integration")

    # Diverged and not checked out: a merge commit, made without touching the user's checkout.
    git(repo, "switch", "-q", "release")
    (repo / "rel.txt").write_text("release note\n")
    git(repo, "add", "rel.txt")
    git(repo, "commit", "-q", "-m", "release note")
    git(repo, "switch", "-q", "main")
    before = git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain")
    landed = gr.merge_into("release")
    assert landed.how == "merge"
    assert git(repo, "rev-parse", "release") == landed.commit
    assert {"a.txt", "rel.txt"} <= set(git(repo, "ls-tree", "--name-only", "release").split())
    assert (git(repo, "rev-parse", "HEAD"), git(repo, "status", "--porcelain")) == before
    assert git(home / "_integration", "rev-parse", "HEAD") == tip

    # Checked out and dirty: refused, nothing changed.
    (repo / "app.txt").write_text("my unsaved edit\n")
    with pytest.raises(GitError, match="uncommitted changes"):
        gr.merge_into("main")
    assert git(repo, "rev-parse", "main") == before[0]

    # Checked out and clean: fast-forward in place.
    git(repo, "checkout", "--", "app.txt")
    landed = gr.merge_into("main")
    assert landed.how == "fast-forward" and landed.commit == tip
    assert (repo / "a.txt").read_text() == "x\n"
    assert git(repo, "status", "--porcelain") == ""
    assert gr.merge_into("main").how == "up-to-date"


def test_merge_into_conflict_leaves_target_alone(repo: Path, home: Path) -> None:
    git(repo, "branch", "side")
    gr = make(repo, home)
    do_task(gr, home / "w1", "t1", {"app.txt": "from task\n"})
    assert gr.merge("t1", "A").status == "merged"
    git(repo, "switch", "-q", "side")
    (repo / "app.txt").write_text("from the user\n")
    git(repo, "commit", "-q", "-am", "user edit")
    side = git(repo, "rev-parse", "side")
    git(repo, "switch", "-q", "main")
    with pytest.raises(GitError, match=r"conflicts in app\.txt"):
        gr.merge_into("side")
    assert git(repo, "rev-parse", "side") == side
    assert git(home / "_integration", "status", "--porcelain") == ""


def test_delete_modify_conflict_has_no_content_on_the_deleting_side(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    gr.start_task(home / "w1", "t1")
    (home / "w1" / "app.txt").unlink()
    assert gr.commit_all(home / "w1", "drop app") is not None
    do_task(gr, home / "w2", "t2", {"app.txt": "edited\n"})
    assert gr.merge("t1", "drop").status == "merged"
    out = gr.merge("t2", "edit")
    assert out.status == "conflict"
    assert out.conflicts == (("app.txt", None, "edited\n"),)


def test_merge_refuses_when_integration_branch_is_checked_out_by_the_user(
    repo: Path, home: Path
) -> None:
    gr = make(repo, home)
    do_task(gr, home / "w1", "t1", {"a.txt": "x\n"})
    git(repo, "switch", "-q", "multibot/integration")
    with pytest.raises(GitError, match="checked out in"):
        gr.merge("t1", "A")
    git(repo, "switch", "-q", "main")
    assert gr.merge("t1", "A").status == "merged"


def test_busy_integration_lock_times_out_with_a_clear_error(repo: Path, home: Path) -> None:
    gr = make(repo, home, lock_timeout=0.2)
    holder = filelock.FileLock(str(home / "._integration.lock"))
    with holder, pytest.raises(LockTimeout):
        gr.recover()
    assert gr.recover().actions == ()


def test_workers_start_and_commit_at_the_same_time(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            wt = home / f"w{n}"
            gr.start_task(wt, f"t{n}")
            for i in range(3):
                (wt / f"f{n}-{i}.txt").write_text(f"{n} {i}\n")
                assert gr.commit_all(wt, f"step {i}") is not None
        except BaseException as e:  # reported below: a thread's failure must fail the test
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    for n in range(4):
        assert len(gr.changed_files(f"multibot/t{n}")) == 3
        assert gr.merge(f"t{n}", f"task {n}").status == "merged"


def test_worker_side_functions_need_only_the_worktree_folder(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    wt = gr.ensure_worktree(home / "w1")
    with pytest.raises(GitError, match="detached HEAD"):
        checkout.commit_all(wt, "no branch yet")
    gr.start_task(wt, "t1")
    (wt / "a.txt").write_text("x\n")
    assert checkout.has_uncommitted(wt)
    sha = checkout.commit_all(wt, "work")
    assert sha == checkout.head_commit(wt) == gr.head_commit(wt)
    assert checkout.changed_files(wt, "multibot/integration") == ["a.txt"]
    assert "+x" in gr.diff("multibot/t1")
    with pytest.raises(InvalidId):
        checkout.changed_files(wt, "--output=/tmp/x")


def test_resolved_conflict_without_diff_is_still_committed(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    do_task(gr, home / "w1", "t1", {"app.txt": "from t1\n"})
    do_task(gr, home / "w2", "t2", {"app.txt": "from t2\n"})
    assert gr.merge("t1", "one").status == "merged"
    assert gr.merge("t2", "two").status == "conflict"
    # The conflict task: merge integration into t2's branch and keep t2's side.
    w2 = home / "w2"
    merge = ["git", *USER, "merge", "multibot/integration"]
    done = subprocess.run(merge, cwd=w2, capture_output=True)
    assert b"CONFLICT" in done.stdout, done.stderr
    git(w2, "checkout", "--ours", "app.txt")
    git(w2, "add", "app.txt")
    assert checkout.snapshot(w2).dirty == ()  # nothing shows, but the merge is to commit
    assert checkout.settled(w2) is None
    sha = checkout.commit_all(w2, "resolve")
    assert sha is not None
    assert len(git(w2, "rev-list", "--parents", "-n", "1", sha).split()) == 3
    out = gr.merge("t2", "two")
    assert out.status == "merged"
    assert git(repo, "show", "multibot/integration:app.txt") == "from t2"


def test_quick_start_makes_the_branch_at_the_integration_tip(
    repo: Path, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gr = make(repo, home)
    w1 = home / "w1"
    do_task(gr, w1, "t1", {"a.txt": "x\n"})
    assert gr.merge("t1", "A").status == "merged"
    git(repo, "pack-refs", "--all")  # the tip is read from packed-refs as well as ref files
    tip = git(repo, "rev-parse", "multibot/integration")
    started = gr.quick_start(w1, "t2")
    assert started == worktrees.TaskStart("multibot/t2", tip)
    assert git(w1, "symbolic-ref", "--short", "HEAD") == "multibot/t2"
    assert git(w1, "rev-parse", "HEAD") == tip and (w1 / "a.txt").exists()
    # Nothing done: the finish needs one `git status` to know there is nothing to report.
    assert checkout.settled(w1) == tip
    assert checkout.changed_files(w1, "multibot/integration") == []
    (w1 / "b.txt").write_text("y\n")
    assert checkout.settled(w1) is None
    sha = checkout.commit_all(w1, "work")
    assert sha is not None and checkout.settled(w1) == sha != tip
    assert checkout.changed_files(w1, "multibot/integration") == ["b.txt"]
    assert gr.quick_start(w1, "t3") == worktrees.TaskStart("multibot/t3", tip)
    # Already at the tip (t3 did nothing yet): the next branch starts right there.
    assert gr.quick_start(w1, "t4") == worktrees.TaskStart("multibot/t4", tip)
    assert git(w1, "symbolic-ref", "--short", "HEAD") == "multibot/t4"
    assert git(w1, "rev-parse", "HEAD") == tip
    # The caller saw it clean at the tip moments ago: no `git status`, one `git switch`.
    ran: list[str] = []
    real_git = worktrees.run_git

    def spy(cwd: Path, *args: str, **kw: Any) -> tuple[int, str, str]:
        ran.append(args[0])
        return real_git(cwd, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(worktrees, "run_git", spy)
        assert gr.quick_start(w1, "t5", clean_at=tip) == worktrees.TaskStart("multibot/t5", tip)
    assert ran == ["switch"]
    assert git(w1, "symbolic-ref", "--short", "HEAD") == "multibot/t5"
    # Vouched for at a commit HEAD has left since: nothing done, for the careful way.
    sha = do_task(gr, w1, "t5", {"c.txt": "z\n"})
    assert gr.quick_start(w1, "t6", clean_at=tip) is None
    assert git(w1, "symbolic-ref", "--short", "HEAD") == "multibot/t5"
    assert gr.quick_start(w1, "t6", clean_at=sha) == worktrees.TaskStart("multibot/t6", tip)
    assert git(w1, "rev-parse", "HEAD") == tip and not (w1 / "c.txt").exists()
    git(w1, "switch", "--quiet", "--detach")
    assert gr.quick_start(w1, "t7", clean_at=tip) is None


def test_quick_start_leaves_what_it_cannot_do_to_the_careful_way(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    w1, w2 = home / "w1", home / "w2"
    tip = git(repo, "rev-parse", "multibot/integration")
    # No worktree yet, or a new one (detached): made and checked the careful way.
    assert gr.quick_start(w1, "t1") is None and not w1.exists()
    assert gr.begin_task(w1, "t1") == worktrees.TaskStart("multibot/t1", tip)
    gr.ensure_worktree(w2)
    assert gr.quick_start(w2, "t2") is None
    assert gr.begin_task(w2, "t2") == worktrees.TaskStart("multibot/t2", tip)
    # Dirty (untracked, or a tracked file changed): refused as start_task refuses, untouched.
    for name in ("new.txt", "app.txt"):
        (w1 / name).write_text("half done\n")
        assert gr.quick_start(w1, "t3") is None
        with pytest.raises(GitError, match=f"uncommitted changes \\({name}\\)"):
            gr.begin_task(w1, "t3")
        if name == "app.txt":
            git(w1, "checkout", "--", name)
        else:
            (w1 / name).unlink()
    assert git(w1, "symbolic-ref", "--short", "HEAD") == "multibot/t1"
    assert "multibot/t3" not in gr.task_branches()
    # Resumed in place: kept as left.
    assert gr.quick_start(w1, "t1") is None
    assert gr.begin_task(w1, "t1") == worktrees.TaskStart("multibot/t1")
    # The task comes back to another worker: its branch exists (and w1 lets go of it).
    sha = do_task(gr, w1, "t1", {"a.txt": "x\n"})
    assert gr.quick_start(w2, "t1") is None
    assert gr.begin_task(w2, "t1") == worktrees.TaskStart("multibot/t1")
    assert git(w2, "rev-parse", "HEAD") == sha
    # Not a worker worktree at all.
    assert gr.quick_start(home / "_integration", "t4") is None
    with pytest.raises(GitError, match="integration worktree"):
        gr.begin_task(home / "_integration", "t4")
    with pytest.raises(InvalidId):
        gr.quick_start(w1, "../evil")


def test_snapshot_reads_one_status(repo: Path, home: Path) -> None:
    gr = make(repo, home)
    wt = home / "w1"
    gr.start_task(wt, "t1")
    head = git(wt, "rev-parse", "HEAD")
    assert checkout.snapshot(wt) == checkout.Snapshot(head, "multibot/t1", ())
    git(wt, "mv", "app.txt", "moved app.txt")
    (wt / "z new.txt").write_text("x\n")
    (wt / "debug.log").write_text("ignored\n")
    assert checkout.snapshot(wt).dirty == ("moved app.txt", "z new.txt")
    git(wt, "reset", "--hard", "-q")
    (wt / "z new.txt").unlink()
    git(wt, "switch", "--detach", "-q")
    assert checkout.snapshot(wt) == checkout.Snapshot(head, None, ())
    assert checkout.settled(wt) is None  # commit_all says why: not on a branch
