"""The worker process, in parts.

| module | what it owns |
| --- | --- |
| `loop.py` (`Worker`) | the loop: heartbeat, inbox, the agent, a task from start to report |
| `branches.py` (`Branches`) | a task's branch: quick in the loop, or careful in a thread |
| `pause.py` (`PauseWatch`) | the person's pause and the run's, read off the loop that beats |
| `outbox.py` (`Outbox`) | messages sent in order, each once it can be made durable |
| `progress.py` (`Progress`) | a task's turns, tool and cost, and its output shown (capped) |
| `relay.py` (`Relay`) | the agent's `report` and `ask` passed on; the answers passed back |
| `writes.py` (`StateWrites`) | the state file's lazy writes and the memory's; `Replaced` |
| `launch.py` | the worker's key, its agent's environment, spec and context file |
| `report.py` | pure: the end-of-task report, and what the worker remembers |
"""

from multibot.worker.loop import Worker
from multibot.worker.progress import TASK_OUTPUT_SHOWN
from multibot.worker.writes import LAZY_STATE_S

__all__ = ["LAZY_STATE_S", "TASK_OUTPUT_SHOWN", "Worker"]
