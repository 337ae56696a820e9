"""The fast deterministic backward with its blocks taking their tiles as if the GPU started them
in reverse order (the last block first), for tests/test_cuda.py, which runs this in a process of
its own so that a hang fails one test by a timeout instead of stopping the test run.

    python tests/start_order.py CAUSAL N NUM_SMS    (CAUSAL 0 or 1; NUM_SMS 0: the whole GPU)

Prints "equal" if dQ, dK, dV equal those of the usual order on the whole GPU, bit for bit; else
the names of those that differ, or "skip: <why>" where there are no green contexts.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flash_attention as fa  # noqa: E402
from conftest import on_sms, random_qkv  # noqa: E402

causal, N, num_sms = bool(int(sys.argv[1])), int(sys.argv[2]), int(sys.argv[3])
q, k, v = random_qkv(4, 8, N, N, device="cuda", seed=N)
dout = torch.randn_like(q)
ext = fa._extension()
O, L = ext.forward(q, k, v, causal, 0.125, "fast")


def backward(reversed_start):
    return ext.backward(dout, q, k, v, O, L, causal, 0.125, True, "fast", reversed_start=reversed_start)


usual = backward(False)
try:
    reverse = on_sms(num_sms, lambda: backward(True)) if num_sms else backward(True)
except pytest.skip.Exception as e:
    print(f"skip: {e}")
    sys.exit(0)
torch.cuda.synchronize()
differ = [name for name, a, b in zip(("dQ", "dK", "dV"), usual, reverse) if not torch.equal(a, b)]
print(" ".join(differ) or "equal")
