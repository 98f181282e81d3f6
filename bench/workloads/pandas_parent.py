"""Parent of the prepare-pandas benchmark.

Imports numpy and pandas, builds a 1e6-row DataFrame (int, float,
categorical and string columns), prints READY and stops itself with
SIGSTOP; if continued it prints RESUMED and stops again (the benchmark
fails if it sees that: Prepare must leave a stopped parent stopped).
"""
import os
import signal

import numpy as np
import pandas as pd

N = 1_000_000
rng = np.random.default_rng(12345)
cats = ["cat-%02d" % i for i in range(50)]
df = pd.DataFrame(
    {
        "id": np.arange(N, dtype=np.int64),
        "x": rng.standard_normal(N),
        "cat": pd.Categorical.from_codes(rng.integers(0, len(cats), N), categories=cats),
        "name": ["row-%d" % i for i in range(N)],
    }
)
assert len(df) == N
print("READY", flush=True)
while True:
    os.kill(os.getpid(), signal.SIGSTOP)
    os.write(1, b"RESUMED\n")
