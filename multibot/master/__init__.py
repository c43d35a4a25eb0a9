"""The master process, in parts: the loop and its collaborators.

| module | what it owns |
| --- | --- |
| `loop.py` (`Master`) | the loop: messages, edits, supervision, assignments, the durable turn |
| `jobs.py` (`Jobs`) | the background threads for slow work, in lanes (verify, build, check) |
| `merging.py` (`MergeQueue`) | pure: which batch is checked next, how a failed one is split |
| `pipeline.py` (`Pipeline`) | verify commands and the merge queue's candidates, run through jobs |
"""

from multibot.master.loop import EXIT_DONE, EXIT_FAILED, Master

__all__ = ["EXIT_DONE", "EXIT_FAILED", "Master"]
