"""Child processes that end with the entry point that started them.

SIGTERM's default action ends a Python process at once: no ``finally`` runs, so a trainer's local reward
services, or the study's trainer child, stay behind. :func:`stop_on_sigterm` makes SIGTERM act like
Ctrl-C (``KeyboardInterrupt``), so cleanup runs; :func:`run` stops its child with SIGTERM (then SIGKILL
after the grace period) when interrupted, where ``subprocess.run`` would SIGKILL it and leave the
child's own children; and every child is asked to receive SIGTERM if its parent dies without cleaning
up (``PR_SET_PDEATHSIG``, Linux), so even a SIGKILLed entry point leaves nothing running.
"""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

STOPPED_EXIT_CODE = 128 + signal.SIGTERM
"""What an entry point returns when a signal stopped it (the shell's convention for SIGTERM)."""

_PR_SET_PDEATHSIG = 1


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def stop_on_sigterm() -> None:
    """From now on SIGTERM raises KeyboardInterrupt in the main thread, as SIGINT does."""
    signal.signal(signal.SIGTERM, _interrupt)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. The signal is sent when the *thread* that forked the
    # child exits, so children are started from the main thread only.
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def popen(cmd: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` whose child gets SIGTERM if this process dies."""
    return subprocess.Popen(list(cmd), preexec_fn=_die_with_parent, **kwargs)


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM, up to ``grace_s`` to exit (a trainer stops its own children meanwhile), then SIGKILL."""
    stop_all([proc], grace_s)


def stop_all(procs: Sequence[subprocess.Popen], grace_s: float = 30.0) -> None:
    """:func:`stop` for several children at once: all are signalled first, so they share one grace."""
    live = [p for p in procs if p.poll() is None]
    for proc in live:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in live:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(cmd: Sequence[str], *, grace_s: float = 30.0, **kwargs: Any) -> None:
    """Run ``cmd`` to completion (``CalledProcessError`` on failure); stop it gracefully if interrupted."""
    proc = popen(cmd, **kwargs)
    try:
        code = proc.wait()
    except BaseException:
        stop(proc, grace_s)
        raise
    if code != 0:
        raise subprocess.CalledProcessError(code, list(cmd))
