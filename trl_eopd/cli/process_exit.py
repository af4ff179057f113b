"""How a process that ran a torch process group ends: everything flushed, then without the interpreter's teardown.

`destroy_process_group()` takes a group out of torch's registry, but the C++ group lives on while anything still holds
it (device meshes, FSDP module states, DeepSpeed's engine and communication backend, accelerate's state), and these
are not freed by the end of a run, nor by a garbage collection. So gloo's event-loop and worker threads (and, on rank
0, the TCPStore server's thread) are still running when Python exits; the interpreter's finalization and the C++
static destructors then tear the objects down in no fixed order, and now and then a thread that is still joinable is
destroyed: `terminate called without an active exception` and SIGABRT (exit status -6), after the run's work is done.
torch offers no way to stop and join gloo's threads (pytorch/pytorch#130345). A process whose whole job was the run
therefore ends with `os._exit`, once Python's exit handlers have run and the standard streams are flushed: exactly the
teardown that aborts is the one skipped.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import NoReturn


def launched_worker() -> bool:
    """Whether this process is one worker of `accelerate launch` / `torchrun`, which set `LOCAL_RANK` for each."""
    return "LOCAL_RANK" in os.environ


def exit_without_teardown(code: int = 0) -> NoReturn:
    """Run Python's exit handlers (trackers, logging, temporary files), flush stdout and stderr, then `os._exit`.

    Call it only once every process group is destroyed and every file is written and closed: the interpreter's own
    finalization (and so any `__del__` that has not run yet) is skipped.
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to say on it
            pass
    os._exit(code)
