"""Prefill's large intermediate arrays reuse heap pages instead of faulting fresh ones in."""
import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from torchless.memory import keep_freed_memory
    tuned = keep_freed_memory()
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        a = np.empty(16 << 18, np.float32)  # 16 MiB, above glibc's default mmap threshold
        a.fill(1.0)
        del a
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(int(tuned), *faults)
""")


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).gnu_get_libc_version
        return sys.platform.startswith("linux")
    except (OSError, AttributeError):
        return False


def _run(tmp_path, **env):
    script = tmp_path / "alloc.py"
    script.write_text(_SCRIPT)
    out = subprocess.run([sys.executable, str(script)], env=dict(os.environ, **env),
                         capture_output=True, text=True, check=True, timeout=300)
    tuned, *faults = (int(v) for v in out.stdout.split())
    return bool(tuned), faults


@pytest.mark.skipif(not _glibc(), reason="the tuning applies to glibc on Linux only")
def test_tuned_allocator_reuses_freed_pages(tmp_path):
    tuned, faults = _run(tmp_path)
    assert tuned
    # the first pass faults the block in (fewer faults than its 4096 pages where NumPy asks
    # for huge pages), later passes reuse it
    assert faults[0] >= 100
    assert faults[1] * 10 < faults[0] and faults[2] * 10 < faults[0], faults


@pytest.mark.skipif(not _glibc(), reason="the tuning applies to glibc on Linux only")
def test_opt_out_leaves_glibc_alone(tmp_path):
    tuned, faults = _run(tmp_path, TORCHLESS_MALLOC_TUNING="0")
    assert not tuned
    # glibc's own default maps the first block fresh and frees it back to the system, so the
    # second pass faults its pages in again (what the tuning avoids)
    assert faults[1] * 2 > faults[0] >= 100, faults


def test_building_a_model_tunes_the_allocator(make_checkpoint):
    import torchless
    from torchless import memory

    torchless.ModelLoader.load_auto(make_checkpoint())
    assert memory._state is not None
    assert memory._state == _glibc()
