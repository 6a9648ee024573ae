"""CPU processes of the shapes world: OpenMP workers that wait without spinning."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence


def reexec_with_passive_openmp(module: str, argv: Sequence[str]) -> None:
    """Restart ``python -m module argv`` with ``OMP_WAIT_POLICY=PASSIVE`` unless a policy is already set.

    By default OpenMP workers spin at every barrier. On a CPU shared with other jobs a spinning worker burns
    the time slice its partner needs: on this 2-core machine under load a 2-thread pretraining step took
    3.9–13.8 s spinning and 0.7 s passive (docs/shapes.md). OpenMP reads the policy once when torch loads,
    hence the restart. Waiting policy does not change any result.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
