"""example_training.py under torchrun, with process 1 failing at its sixth batch: for
tests/test_training.py, which checks that this ends with one line from that process and no hang."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import example_training as et  # noqa: E402

real_batch, calls = et.Sorting.batch, []


def batch(self, *args, **kwargs):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) > 5:
        raise RuntimeError("the sixth batch failed\nsecond line of the message")
    return real_batch(self, *args, **kwargs)


et.Sorting.batch = batch
sys.exit(et.main())
