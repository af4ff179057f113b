"""How a process that ran a torch process group ends: everything flushed, then without the interpreter's teardown.

`destroy_process_group()` takes a group out of torch's registry, but the C++ group lives on while anything still holds
it (device meshes, FSDP module states, DeepSpeed's engine and communication backend), and neither the end of a run nor
a garbage collection frees them: gloo's event-loop and worker threads are still running when Python exits. A C++
thread that needs the interpreter while Python finalizes (a gloo worker releasing the last tensor of a finished
operation, any thread coming back from torch with the GIL released) is stopped by Python with `pthread_exit`, whose
unwinding through a C++ destructor ends in `std::terminate`: "terminate called without an active exception" and
SIGABRT (exit status -6), after the run's work is done, more often the busier the machine. torch has no way to stop and
join gloo's threads (pytorch/pytorch#130345), so a process whose whole job was the run ends with `os._exit`, once
Python's exit handlers have run and the standard streams are flushed: only the finalization that aborts is skipped.
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
