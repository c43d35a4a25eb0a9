"""Child processes for the state-file tests: a system writer, a hand editor, a lock holder.

python tests/store_child.py count PATH N [DONE_FLAG]
    do N update() increments of count (retrying when a hand edit is broken for an instant);
    then, if DONE_FLAG is given, wait for that file and do one last no-op update, as a running
    system would, so a save that raced the last write is taken in; print N
python tests/store_child.py edit PATH N TAG
    make N hand edits that append TAG-i to notes, cycling three editor styles: save by rename,
    rewrite in place with O_TRUNC at open, and read-then-rewrite through one r+ descriptor
python tests/store_child.py hold PATH READY
    take the state file's lock inside update(), touch READY, then hang
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from multibot.errors import StateError  # noqa: E402
from multibot.store import StateFile  # noqa: E402


class Counter(BaseModel):
    """The small state model the store tests use."""

    model_config = ConfigDict(extra="forbid")

    version: int = 0
    count: int = 0
    paused: bool = False
    notes: list[str] = []


def inc(state: Counter) -> Counter:
    """Return state with count one higher."""
    return state.model_copy(update={"count": state.count + 1})


def count(path: Path, n: int, done_flag: Path | None) -> None:
    sf = StateFile(path, Counter, Counter)
    done = 0
    while done < n:
        try:
            sf.update(inc)
        except StateError:  # an in-place save caught half-way: retry, as the master would
            time.sleep(0.002)
            continue
        done += 1
    if done_flag is not None:
        deadline = time.monotonic() + 60
        while not done_flag.exists() and time.monotonic() < deadline:
            sf.read()  # a running system polls its files, taking in saves that raced it
            time.sleep(0.01)
        while True:
            try:
                sf.update(lambda s: s)
                break
            except StateError:
                time.sleep(0.002)
    print(done, flush=True)


def _load(path: Path) -> dict[str, Any]:
    while True:  # the file is missing for an instant inside a system write
        try:
            data = json.loads(path.read_bytes())
            assert isinstance(data, dict)
            return data
        except (FileNotFoundError, ValueError):
            time.sleep(0.0005)


def _render(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def edit(path: Path, n: int, tag: str) -> None:
    for i in range(n):
        note = f"{tag}-{i}"
        style = i % 3
        if style == 0:  # vim/emacs default: write a new file, rename it over
            data = _load(path)
            data["notes"].append(note)
            tmp = path.with_name(f"{path.name}.{tag}.swp")
            tmp.write_bytes(_render(data))
            os.replace(tmp, path)
        elif style == 1:  # nano, VS Code, `>`: open with O_TRUNC (creating if absent), write
            data = _load(path)
            data["notes"].append(note)
            with open(path, "wb") as f:
                f.write(_render(data))
        else:  # read and rewrite through one descriptor, truncating at the end
            while True:
                try:
                    g = open(path, "r+b")  # noqa: SIM115
                except FileNotFoundError:
                    time.sleep(0.0005)
                    continue
                with g:
                    try:
                        data = json.loads(g.read())
                    except ValueError:
                        continue
                    data["notes"].append(note)
                    g.seek(0)
                    g.write(_render(data))
                    g.truncate()
                break
        # A person sees their save before making the next one (in an editor, at human
        # speed); without this, a save racing a system write and the next save made without
        # it would be two divergent edits of one list, which no merge can reconcile.
        deadline = time.monotonic() + 30
        while note not in _load(path)["notes"]:
            if time.monotonic() > deadline:
                raise SystemExit(f"{note} never showed in {path}: lost")
            time.sleep(0.001)
        time.sleep(random.uniform(0, 0.003))  # pacing, so system writes interleave
    print(n, flush=True)


def hold(path: Path, ready: Path) -> None:
    def hang(state: Counter) -> Counter:
        ready.touch()
        time.sleep(3600)
        return state

    StateFile(path, Counter, Counter).update(hang)


if __name__ == "__main__":
    cmd, target = sys.argv[1], Path(sys.argv[2])
    if cmd == "count":
        count(target, int(sys.argv[3]), Path(sys.argv[4]) if len(sys.argv) > 4 else None)
    elif cmd == "edit":
        edit(target, int(sys.argv[3]), sys.argv[4])
    elif cmd == "hold":
        hold(target, Path(sys.argv[3]))
    else:
        raise SystemExit(f"unknown command {cmd}")
