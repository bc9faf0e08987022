"""One job per run folder: a lease the driver holds for as long as it runs.

`runs/NAME/lease.json` names its holder (host, process, job, start time) and is refreshed every
few seconds by a heartbeat thread. Taking it is an exclusive create, so of two drivers started at
once exactly one wins; the other — or a re-submitted copy of a running job — stops with one line
naming the holder before any worker starts. A driver that dies without releasing it (SIGKILL, a
lost node) stops refreshing it: on the same host its process is gone, elsewhere the lease goes
stale after `STALE_S` without a heartbeat, and the next job takes it over. The file lives in the
run folder, so it works wherever the folder does — a local disk or a filesystem shared by nodes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from trainer.config import ConfigError

HEARTBEAT_S = 5.0
STALE_S = 60.0
FILE = "lease.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLease:
    def __init__(self, run_path: Path, job: str = "loom train"):
        self.path = Path(run_path) / FILE
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "job": job, "since": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        """The current holder's record if its lease is alive, else None."""
        try:
            record = json.loads(self.path.read_text())
            beat = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        except (ValueError, OSError):  # a lease cut short while being written: its writer died then
            return None
        if record.get("host") == self.me["host"] and not _alive(int(record.get("pid", 0))):
            return None
        return record if time.time() - beat < STALE_S else None

    def acquire(self) -> "RunLease":
        """Takes the lease or raises ConfigError naming its holder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ConfigError(f"cannot create the run folder {self.path.parent}: {err.strerror}") from None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is not None:
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
                    raise ConfigError(f"{self.path.parent} is in use by {holder.get('job', 'another job')} "
                                      f"(pid {holder.get('pid')} on {holder.get('host')}, since {since}); "
                                      f"wait for it, stop it, or choose another name") from None
                self._take_over()
                continue
            except OSError as err:
                raise ConfigError(f"cannot write to the run folder {self.path.parent}: {err.strerror}") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(self.me, fh)
            self._thread = threading.Thread(target=self._beat, daemon=True, name="loom-lease")
            self._thread.start()
            return self
        raise ConfigError(f"could not take the lease {self.path}: another job took it at the same moment")

    def _take_over(self) -> None:
        """Moves a dead holder's lease aside. Two jobs may both find it dead: the one whose rename
        moved a lease taken meanwhile by the other puts that one back."""
        try:
            stale = self.path.read_text()
            aside = self.path.with_name(f"{FILE}.stale-{os.getpid()}")
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if aside.read_text() != stale:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=HEARTBEAT_S)
        try:
            if json.loads(self.path.read_text()).get("pid") == self.me["pid"]:
                self.path.unlink()
        except (FileNotFoundError, ValueError):
            pass

    def __enter__(self) -> "RunLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
