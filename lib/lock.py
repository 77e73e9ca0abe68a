"""One writer per run folder (and per report folder): a lock file that names its holder.

Two grids, or a grid and a notebook, working on the same run would train into the same
checkpoints, delete each other's generation parts and pay twice for judge calls. Whatever
writes a run folder holds ``<folder>/.lock`` first; a second comer stops with one line naming
the holder (pid, host, start time), or waits for it when asked to.

The lock works on a shared filesystem (NFS under Slurm included):

* taking it is one atomic ``link()`` of a file that already holds the holder's details (the
  classic NFS-safe lock; where hard links are not supported, ``O_CREAT | O_EXCL``);
* the holder touches the file every :data:`HEARTBEAT_S` seconds from a daemon thread;
* a lock is *stale* when its holder is gone: on the same host, its pid is not running (or is a
  different process, by start time); on another host, its heartbeat is older than
  :data:`STALE_AFTER_S`, measured against the filesystem's own clock (a file touched now), so
  clock differences between nodes do not matter;
* a stale lock is taken over under a short-lived breaker file (``.lock.break``): the breaker
  re-reads the lock and removes it only if it is still the very lock found stale, so two
  processes that both saw it stale cannot remove each other's fresh lock.

A grid runner passes the locks it holds to the notebooks it starts through the environment
(:data:`ENV_HELD`), so the notebook sees its parent's lock and goes on, while any other
process (another grid, a notebook opened by hand) does not.
"""
from __future__ import annotations

import atexit
import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

LOCK_NAME = ".lock"
ENV_HELD = "EM_LAB_HELD_LOCKS"  # JSON {folder: token} of locks a parent process holds for us
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0           # no heartbeat for this long: the holder (on another host) is gone
BREAKER_STALE_S = 30.0          # a breaker older than this was left by a killed process


class LockError(RuntimeError):
    """The folder is in use by another live process; the message is one line naming it."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str        # ISO time the lock was taken (UTC)
    token: str          # unique per acquisition
    what: str = ""      # "run demo_medical", "report outputs/report"
    proc_start: float | None = None  # the holder process's start time (pid reuse check)
    command: str = ""

    def describe(self) -> str:
        cmd = f" ({self.command})" if self.command else ""
        return f"pid {self.pid} on host {self.host} since {self.started}{cmd}"


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _proc_start(pid: int) -> float | None:
    try:
        import psutil  # only when memory is measured

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _pid_alive(pid: int, proc_start: float | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    if proc_start is not None:
        now_start = _proc_start(pid)
        if now_start is not None and abs(now_start - proc_start) > 1.0:
            return False  # the pid was reused by another process
    return True


def _command() -> str:
    argv = [os.path.basename(sys.argv[0])] + sys.argv[1:] if sys.argv and sys.argv[0] else []
    text = " ".join(argv)
    if "ipykernel" in text:
        text = "a notebook kernel"
    return text[:120]


def read_holder(path: Path) -> Holder | None:
    """The holder recorded in a lock file; None when the file is gone or not written yet."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return Holder(**{k: data.get(k) for k in Holder.__dataclass_fields__ if k in data})
    except (OSError, ValueError, TypeError):
        return None


def _fs_now(folder: Path) -> float:
    """The filesystem's current time (mtime of a file created now): on NFS the server's clock,
    which is what lock files' mtimes are measured in."""
    probe = folder / f".lock.clock.{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"")
        return probe.stat().st_mtime
    except OSError:
        return time.time()
    finally:
        try:
            probe.unlink()
        except OSError:
            pass


def is_stale(path: Path, holder: Holder | None, stale_after_s: float = STALE_AFTER_S) -> bool:
    """Whether the lock at ``path`` (held by ``holder``) was left by a process that is gone."""
    try:
        age = _fs_now(path.parent) - path.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: not stale, just free
    if holder is None:
        # unreadable or still being written (O_EXCL fallback): stale only when old
        return age > stale_after_s
    if holder.host == socket.gethostname():
        return not _pid_alive(int(holder.pid), holder.proc_start)
    return age > stale_after_s


def _held_by_parent() -> dict[str, str]:
    try:
        data = json.loads(os.environ.get(ENV_HELD, "") or "{}")
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}


class FolderLock:
    """The lock of one folder. ``acquire()`` / ``release()``, or use it as a context manager."""

    def __init__(self, folder: str | Path, what: str = "", stale_after_s: float = STALE_AFTER_S,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        self.folder = Path(folder).resolve()
        self.path = self.folder / LOCK_NAME
        self.what = what or f"folder {self.folder}"
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.holder: Holder | None = None   # ours, while held
        self.inherited = False               # held by the parent process (grid runner)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: Holder | None = None  # the stale holder we replaced, if any

    # -- state -------------------------------------------------------------------------------
    @property
    def held(self) -> bool:
        return self.holder is not None or self.inherited

    def env(self) -> dict[str, str]:
        """Environment entry that lets child processes (notebook kernels) use this lock."""
        if self.holder is None:
            return {}
        held = _held_by_parent()
        held[str(self.folder)] = self.holder.token
        return {ENV_HELD: json.dumps(held)}

    # -- acquire / release ---------------------------------------------------------------------
    def acquire(self, wait: float | None = 0.0, poll_s: float = 1.0,
                on_wait: Callable[[str], None] | None = None,
                hint: str = "wait for it to finish, or pass --wait-lock") -> "FolderLock":
        """Take the lock. ``wait``: seconds to wait for a live holder (0: stop at once with
        :class:`LockError`; None: wait as long as it takes). ``on_wait`` gets one line when
        waiting starts; ``hint`` ends the error line when not waiting."""
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        parent_token = _held_by_parent().get(str(self.folder))
        if parent_token:
            current = read_holder(self.path)
            if current is not None and current.token == parent_token:
                self.inherited = True
                return self
        deadline = None if wait is None else time.monotonic() + wait
        told = False
        while True:
            if self._try_create():
                self._start_heartbeat()
                return self
            holder = read_holder(self.path)
            if is_stale(self.path, holder, self.stale_after_s):
                if self._break(holder):
                    self.took_over = holder
                continue
            if holder is None:  # being written or just released: look again
                time.sleep(0.05)
                continue
            msg = f"{self.what} is in use by {holder.describe()} (lock {self.path})"
            if deadline is not None and time.monotonic() >= deadline:
                raise LockError(f"{msg}; {hint if not wait else f'gave up after {wait:g}s'}")
            if not told and on_wait is not None:
                on_wait(f"waiting: {msg}")
                told = True
            time.sleep(poll_s if deadline is None else max(0.01, min(poll_s, deadline - time.monotonic())))

    def _try_create(self) -> bool:
        holder = Holder(pid=os.getpid(), host=socket.gethostname(), started=_now_iso(), token=uuid.uuid4().hex,
                        what=self.what, proc_start=_proc_start(os.getpid()), command=_command())
        body = json.dumps(asdict(holder), indent=1) + "\n"
        tmp = self.folder / f".lock.{holder.token}.tmp"
        tmp.write_text(body, encoding="utf-8")
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return False
        except OSError as e:  # no hard links here (some FUSE / SMB mounts): exclusive create
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(body)
        finally:
            try:
                tmp.unlink()
            except OSError:
                pass
        self.holder = holder
        return True

    def _break(self, stale: Holder | None) -> bool:
        """Remove the stale lock if it is still the one found stale; True when removed."""
        breaker = self.folder / (LOCK_NAME + ".break")
        try:
            fd = os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                if _fs_now(self.folder) - breaker.stat().st_mtime > BREAKER_STALE_S:
                    breaker.unlink()
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return False
        os.close(fd)
        try:
            again = read_holder(self.path)
            same = (again is None and stale is None) or (again is not None and stale is not None
                                                        and again.token == stale.token)
            if same and is_stale(self.path, again, self.stale_after_s):
                try:
                    self.path.unlink()
                    return True
                except FileNotFoundError:
                    return False
            return False
        finally:
            try:
                breaker.unlink()
            except FileNotFoundError:
                pass

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                cur = read_holder(self.path)
                if self.holder is None or cur is None or cur.token != self.holder.token:
                    return  # released, or (should never happen) taken from us
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        self._thread = threading.Thread(target=beat, name=f"lock-heartbeat {self.folder.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Give the lock back (a no-op when it was inherited or not held)."""
        if self.inherited:
            self.inherited = False
            return
        if self.holder is None:
            return
        self._stop.set()
        cur = read_holder(self.path)
        if cur is not None and cur.token == self.holder.token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self.holder = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def hold(folder: str | Path, what: str = "", wait: float | None = None) -> FolderLock:
    """For notebooks: the folder's lock for the life of this process (released at exit or by
    ``.release()`` in the notebook's last cell). Inside a grid run it is the grid's own lock.
    ``wait``: seconds to wait for another holder; default from ``EM_LAB_LOCK_WAIT`` (unset: stop
    at once; ``inf``: wait as long as it takes)."""
    if wait is None:
        env = os.environ.get("EM_LAB_LOCK_WAIT", "").strip()
        wait = 0.0 if not env else (None if env.lower() in ("inf", "forever") else float(env))
    lock = FolderLock(folder, what)
    lock.acquire(wait=wait, on_wait=lambda line: print(line, flush=True),
                 hint="wait for it to finish (set EM_LAB_LOCK_WAIT=SECONDS or inf to wait)")
    if lock.took_over is not None:
        print(f"took over a stale lock left by {lock.took_over.describe()}", flush=True)
    atexit.register(lock.release)
    return lock
