"""Ends the embedded Ray cluster's processes if its driver dies without shutting it down.

Ray ties most processes of a local cluster to its driver, but not all: after a SIGKILL of the
driver, its dashboard and runtime-env agents live on. `Watcher(processes)` starts a small process in
its own session holding the read end of a pipe whose write end only the driver has. A driver that
shuts the cluster down says so (`Watcher.release`) and the watcher leaves at once; when the pipe
closes without that — the driver died — the watcher terminates whichever of those processes still
run (matched by PID and start time, so a recycled PID is never hit).

    python -m launch.reaper FD PID:START …
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

DONE = b"x"


class Watcher:
    """The driver's end of the pipe to a watcher process."""

    def __init__(self, processes: list[psutil.Process]):
        read, self._write = os.pipe()
        subprocess.Popen([sys.executable, "-m", "launch.reaper", str(read),
                          *(f"{p.pid}:{p.create_time()}" for p in processes)],
                         pass_fds=(read,), start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(read)

    def release(self) -> None:
        """The cluster was shut down: the watcher has nothing to do."""
        os.write(self._write, DONE)
        os.close(self._write)



def cluster_processes() -> list[psutil.Process]:
    """Every process this driver has started so far (the embedded cluster's, after `ray.init`)."""
    return psutil.Process().children(recursive=True)


def _still_running(pid: int, started: float) -> psutil.Process | None:
    try:
        p = psutil.Process(pid)
        return p if abs(p.create_time() - started) < 1e-3 else None
    except psutil.NoSuchProcess:
        return None


def main(argv: list[str]) -> None:
    fd, *entries = argv
    while chunk := os.read(int(fd), 1):  # blocks until the driver's end closes
        if chunk == DONE:
            return
    time.sleep(1.0)  # let Ray's own fate-sharing end what it ends
    alive = [p for p in (_still_running(int(pid), float(t)) for pid, t in (e.split(":") for e in entries)) if p]
    for p in alive:
        p.terminate()
    _, left = psutil.wait_procs(alive, timeout=5)
    for p in left:
        p.kill()


if __name__ == "__main__":
    main(sys.argv[1:])
