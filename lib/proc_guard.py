"""Run a command that must not outlive the process that started it, even when that process is
killed with SIGKILL (a notebook kernel restarted, ``kill -9`` on a grid run).

    python lib/proc_guard.py <stop_wait_s> -- <command> [args...]

The starter opens the guard with ``stdin=subprocess.PIPE`` and ``start_new_session=True`` and never
writes to the pipe: the guard leads its own process group, starts the command in it, and waits for
either of two things. The command exits: the guard exits with its code. The pipe reaches end of file
(the starter is gone, however it died, because the kernel closes its end): the guard sends SIGTERM to
its whole group (the command and every process it started, e.g. vLLM's engine), waits up to
``stop_wait_s`` seconds for the command, then SIGKILL. A SIGTERM to the guard is passed on to the
command; a command killed by signal s makes the guard exit with 128 + s. Standard library only: it runs under whatever Python starts it, before anything else loads.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading


def _stop_group(proc: subprocess.Popen, wait_s: float) -> None:
    """SIGTERM to the group (the guard ignores its own), SIGKILL to what is left after ``wait_s``."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(0, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        pass
    os.killpg(0, signal.SIGKILL)  # the guard too: nothing of the group is left


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: proc_guard.py <stop_wait_s> -- <command> [args...]", file=sys.stderr)
        return 2
    wait_s = float(argv[0])
    if os.getpgrp() != os.getpid():
        os.setsid()  # started without start_new_session: its own group all the same, never the starter's
    proc = subprocess.Popen(argv[2:], stdin=subprocess.DEVNULL)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))

    def exit_with_the_command() -> None:
        code = proc.wait()
        os._exit(code if code >= 0 else 128 - code)  # killed by signal s: 128 + s, as a shell reports it

    threading.Thread(target=exit_with_the_command, daemon=True).start()
    try:
        while os.read(0, 4096):   # the starter never writes: only end of file (it is gone) returns here
            pass
    except OSError:
        pass
    _stop_group(proc, wait_s)     # signals are handled in this (the main) thread only
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
