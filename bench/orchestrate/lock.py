"""The run lock: `run_dir/.lock`, so two workers of a parallel sweep do not run the same config."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

LOCK_HEARTBEAT_S = 60.0  # a running run refreshes its lock's mtime this often
LOCK_STALE_S = 600.0     # a lock not refreshed for this long is taken over, from any host
LOCK_WRITE_S = 5.0       # an empty or garbled lock older than this is not one being written: taken over


class RunLock:
    """`run_dir/.lock` created exclusively. While the run goes on, a thread refreshes the lock's mtime. A lock
    is stale, and taken over, when its holder on this host is dead, when it was not refreshed for LOCK_STALE_S
    (a holder on another host that died, e.g. a Slurm job killed at its time limit), or when it holds no
    `host:pid` (empty or garbled) and is older than LOCK_WRITE_S; a takeover for the last two is logged."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._stop = threading.Event()

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if self._stale():
                    self.path.unlink(missing_ok=True)
                    continue
                return False
            with os.fdopen(fd, "w") as fh:
                fh.write(f"{socket.gethostname()}:{os.getpid()}")
            threading.Thread(target=self._heartbeat, daemon=True).start()
            return True
        return False

    def _stale(self) -> bool:
        try:
            raw = self.path.read_bytes()
            age_s = time.time() - self.path.stat().st_mtime
        except OSError:  # released meanwhile
            return True
        host, _, pid = raw.decode("utf-8", errors="replace").partition(":")
        if not (host and pid.isdigit()):  # empty or garbled: not a lock this code wrote, unless just being written
            if age_s > LOCK_WRITE_S:
                print(f"warning: {self.path}: unreadable lock ({len(raw)} bytes, {age_s:.0f} s old); taking it over")
                return True
            return False
        if host == socket.gethostname() and not _pid_alive(int(pid)):
            return True
        if age_s > LOCK_STALE_S:
            print(f"warning: {self.path}: lock of {host}:{pid} not refreshed for {age_s:.0f} s; taking it over")
            return True
        return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOCK_HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # e.g. the folder was made read-only: the next run takes the stale lock over
            print(f"warning: {self.path}: cannot remove the lock ({exc.strerror}); the next run takes it over")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
