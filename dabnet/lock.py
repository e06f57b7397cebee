"""An exclusive lock on a training run's output folder, so that two runs writing the same --out
cannot overwrite each other's checkpoints and config.

The lock is ``flock`` on ``<out>/.dabnet-train.lock``: the kernel releases it when its holder
exits in any way, ``kill -9`` included, so a lock left behind by a dead run is never stale (the
file stays; the next run takes it and rewrites it). The file names its holder (pid, host, start
time, command) for the refusal message. flock is per host: on a network filesystem shared by
several hosts it may not exclude a run on another host.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".dabnet-train.lock"


class OutputInUseError(RuntimeError):
    """Another process holds the output folder's lock."""


class OutputLock:
    """``with OutputLock(folder):`` holds the folder's lock (creating the folder) or raises
    OutputInUseError naming the folder and the holder."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._file = None

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: run unlocked rather than refuse to train
            print(f"[dabnet] warning: cannot lock {self.folder} on this platform; do not start "
                  "a second run with the same --out", file=sys.stderr)
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = describe_holder(f.read())
            f.close()
            raise OutputInUseError(
                f"output folder {self.folder} is in use by another training run ({holder}); "
                "wait for it to finish, stop it, or choose another --out") from None
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": sys.argv}, f)
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def describe_holder(text: str) -> str:
    """The lock file's holder record in words (or what could be read of it)."""
    try:
        h = json.loads(text)
        cmd = " ".join(map(str, h.get("command") or []))
        return (f"pid {h.get('pid')} on {h.get('host')}, started {h.get('started')}"
                + (f": {cmd}" if cmd else ""))
    except (ValueError, AttributeError):
        return "holder unknown: the lock file names none"
