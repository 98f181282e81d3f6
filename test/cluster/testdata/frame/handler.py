# A function whose initialization loads a 1e6-row pandas frame (the
# platform test, test/cluster/platform_test.go). Every invocation hashes
# the frame it inherited and returns the digest; the reference digest is
# printed by `python3 handler.py` run directly.
import hashlib
import os
import time

import numpy as np
import pandas as pd

ROWS = int(os.environ.get("ROWS", "1000000"))

_rng = np.random.default_rng(20261202)
FRAME = pd.DataFrame({
    "id": np.arange(ROWS, dtype=np.int64),
    "price": _rng.random(ROWS),
    "qty": _rng.integers(1, 1000, ROWS),
    "sym": pd.Categorical(_rng.integers(0, 64, ROWS)),
})

# One line per initialization: the test counts them.
_log = os.environ.get("INIT_LOG")
if _log:
    with open(_log, "a") as f:
        f.write("%d\n" % os.getpid())


def digest(frame):
    h = hashlib.sha256()
    for col in ("id", "price", "qty"):
        h.update(frame[col].to_numpy().tobytes())
    h.update(frame["sym"].cat.codes.to_numpy().tobytes())
    return h.hexdigest()


def handle(req):
    if req.startswith("sleep "):
        words = req.split()
        if len(words) > 2:  # sleep SECONDS PIDFILE: say which process sleeps
            with open(words[2], "w") as f:
                f.write("%d" % os.getpid())
        time.sleep(float(words[1]))
    if req == "raise":
        raise ValueError("bad trade " + req)
    return digest(FRAME)


if __name__ == "__main__":
    print(digest(FRAME))
