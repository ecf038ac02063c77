"""tunelab.heap's compact training heap: freed activations go back to the system, and
train.compact_heap decides when a run gets it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunelab.train.runtime import LONG_SEQUENCE_TOKENS, compact_heap_wanted

# 150 blocks of 2 MiB between small blocks that stay alive, after one 2 MiB block was freed
# (which is what raises glibc's dynamic mmap threshold past that size); prints the MiB that
# freeing the large blocks gave back to the system.
FREED_MIB = """
import sys, torch
from tunelab.heap import compact_heap
from tunelab.memory import proc_kib_field_bytes
if sys.argv[1] == "compact":
    assert compact_heap()
warm = torch.ones(2**19); del warm
big, small = [], []
for _ in range(150):
    big.append(torch.ones(2**19))
    small.append(torch.ones(2**12))
before = proc_kib_field_bytes("/proc/self/status", "VmRSS")
big.clear()
print((before - proc_kib_field_bytes("/proc/self/status", "VmRSS")) // 2**20)
"""


def freed_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", FREED_MIB, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_compact_heap_returns_freed_activations_and_the_default_keeps_them():
    assert freed_mib("compact") >= 250  # of the 300 MiB freed
    assert freed_mib("default") < 50  # glibc's dynamic threshold keeps them in the heap


@pytest.mark.parametrize("setting, budget, length, wanted", [
    ("auto", None, 1024, False),
    ("auto", "2GB", 1024, True),  # the budget's estimate counts live tensors only
    ("auto", None, LONG_SEQUENCE_TOKENS, False),
    ("auto", None, LONG_SEQUENCE_TOKENS + 1, True),
    (True, None, 512, True),
    (False, "2GB", 32768, False),  # an explicit choice wins
])
def test_compact_heap_auto_means_a_budget_or_long_sequences(setting, budget, length, wanted):
    assert compact_heap_wanted(setting, budget, length) is wanted
