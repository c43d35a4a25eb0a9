"""The master process, in parts: the loop and its collaborators.

Each part imports only parts below it in this table; the pure ones touch no file,
process or git, and are tested without them.

| module | what it owns |
| --- | --- |
| `loop.py` (`Master`) | wiring, the order of a turn, of a start and of a resume |
| `steering.py` (`Steering`) | the person's edits applied: hold, cancel, priority, pause, approval |
| `dispatch.py` (`Dispatch`) | assignments, supervision of the workers, resending what may be lost |
| `intake.py` (`Intake`) | the master's inbox: checked, recorded, handed to its handler |
| `results.py` (`Results`) | completions, errors, checks, reviews, merges; retries; the run's end |
| `restore.py` | the tasks from the plan, or from their files after a restart |
| `context.py` (`RunContext`) | what every part shares: the run in memory, the turn, the voice |
| `pool.py` (`WorkerPool`) | the workers: launch, heartbeats, deaths, the restart policy |
| `questions.py` (`Questions`) | questions: FAQ (pure), Opus, escalation to the person, answers |
| `pipeline.py` (`Pipeline`) | verify commands and the merge queue's candidates, run through jobs |
| `merging.py` (`MergeQueue`) | pure: which batch is checked next, how a failed one is split |
| `journal.py` (`TurnJournal`) | the durable turn: task files, outbox, io threads, in that order |
| `jobs.py` (`Jobs`) | the background threads for slow work, in lanes (verify, build, check) |
| `view.py` | system-state.json as a projection of the book, the pool and the ledger |
| `edits.py` (`Edits`) | looking at hand edits in rotation; the pure diff of a person's edit |
| `book.py` (`TaskBook`) | pure: the tasks, their order, status changes, retries, follow-ups |
| `ledger.py` | pure: the one place cost and tokens are added and budgets judged |
| `feedback.py` | pure: what a worker is told (assignments, retries, conflicts) |
| `discoveries.py` | the discoveries shared between workers |
"""

from multibot.master.loop import EXIT_DONE, EXIT_FAILED, Master

__all__ = ["EXIT_DONE", "EXIT_FAILED", "Master"]
