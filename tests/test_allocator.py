"""glibc malloc settings: a request-sized allocation cycle stops page-faulting its memory in anew."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from services.core.allocator import keep_freed_memory

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")

# One request's life on a server: its 25 MB of bytes, 32 decoded 512² images, and two of the model's 22 MB
# float64 resize intermediates, all alive at once (94 MB: more than one 64 MB heap of a thread's arena),
# then freed. The probe counts the minor page faults of five such cycles after a first one, run in the main
# thread or, as the server's model runs, in a worker thread (which glibc would give an arena of its own).
PROBE = """
import resource, sys, threading
from services.core.allocator import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory(1 << 30)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def cycle():
    body = bytearray(25 << 20)
    images = [bytearray(512 * 512 * 3) for _ in range(32)]
    resize_work = [bytearray(22 << 20) for _ in range(2)]
    del body, images, resize_work
def probe():
    cycle()
    before = faults()
    for _ in range(5):
        cycle()
    print(faults() - before)
if sys.argv[2] == "worker":
    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
else:
    probe()
"""


def _faults(mode: str, thread: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode, thread], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip())


@glibc_only
@pytest.mark.parametrize("thread", ["main", "worker"])
def test_freed_request_buffers_are_reused_instead_of_faulted_in_again(thread: str):
    default, tuned = _faults("default", thread), _faults("tuned", thread)
    # 5 cycles touch 5 × 94 MB = 120,000 pages; with glibc's defaults a large share faults in again.
    assert default > 5_000
    assert tuned < default / 10


def test_refuses_a_negative_threshold():
    with pytest.raises(ValueError, match=">= 0"):
        keep_freed_memory(-1)


def test_serve_flag_sets_or_disables_the_allocator_settings():
    from services.core.server import ServerConfig
    from services.server_args import config_from_args, parse_args

    default = config_from_args(parse_args(["compressibility"])).malloc_trim_threshold_bytes
    assert default == ServerConfig().malloc_trim_threshold_bytes
    tuned = parse_args(["compressibility", "--malloc-trim-threshold-mb", "256"])
    assert config_from_args(tuned).malloc_trim_threshold_bytes == 256 * 2**20
    off = parse_args(["compressibility", "--malloc-trim-threshold-mb", "0"])
    assert config_from_args(off).malloc_trim_threshold_bytes is None
