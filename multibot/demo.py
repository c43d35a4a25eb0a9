"""The offline demo: a sample repository and a plan for shell-backend workers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from multibot.errors import MultibotError
from multibot.layout import Home

PLAN = Path(__file__).resolve().parent.parent / "examples" / "demo" / "plan.json"
# What a demo home holds after a run: prepare() deletes a home only if it holds nothing else.
DEMO_ENTRIES = frozenset({"sample-repo", "config", "state", "communication", "worktrees"})
DEMO_CONFIG = """{
  "_comment": "Settings for the offline demo; see docs/configuration.md for every setting.",
  "max_workers": 3,
  "heartbeat_interval": 0.5,
  "idle_worker_timeout": 5,
  "question_policy": "auto"
}
"""


def prepare(home: Home) -> tuple[Path, Path]:
    """Create a fresh demo home with a sample repository; return (repo, plan file)."""
    if home.root.exists():
        # An earlier demo is wiped; anything else (`--home .` by mistake) is refused.
        alien = sorted(p.name for p in home.root.iterdir() if p.name not in DEMO_ENTRIES)
        if alien:
            raise MultibotError(
                f"{home.root} is not a demo home (it holds {', '.join(alien[:5])}); the demo "
                "starts by deleting its home, so give it a new or empty folder"
            )
        shutil.rmtree(home.root)
    repo = home.root / "sample-repo"
    (repo / "calc").mkdir(parents=True)
    (repo / "calc" / "__init__.py").write_text('"""A tiny calculator, grown by multibot."""\n')
    (repo / "README.md").write_text("# calc\n\n(to be written by the team)\n")
    (repo / ".gitignore").write_text("__pycache__/\n")
    git = ["git", "-c", "user.name=multibot demo", "-c", "user.email=demo@multibot.invalid"]
    subprocess.run([*git, "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "calc: empty package"], cwd=repo, check=True)
    home.config_dir.mkdir(parents=True, exist_ok=True)
    home.master_config.write_text(DEMO_CONFIG)
    home.worker_template.write_text('{\n  "backend": "shell"\n}\n')
    return repo, PLAN
