# The platform benchmark's function (bench/platform): its initialization
# imports pandas and builds a 1e6-row frame of trades (~100 MB of Python
# and numpy objects, about a second of CPU); each invocation filters the
# inherited frame by one symbol and aggregates it (a few ms). The paper
# replays an image-processing function; this one has the same shape: an
# expensive init, a short handler over the initialized state.
import os

import numpy as np
import pandas as pd

ROWS = int(os.environ.get("ROWS", "1000000"))
_rng = np.random.default_rng(660323)
FRAME = pd.DataFrame({
    "price": _rng.random(ROWS) * 100,
    "qty": _rng.integers(1, 1000, ROWS),
    "sym": _rng.integers(0, 256, ROWS).astype(np.int16),
})
BY_SYM = FRAME.groupby("sym").indices  # symbol -> row positions, built once


def handle(req):
    sym = (sum(req.encode()) if req else 0) % 256
    rows = FRAME.iloc[BY_SYM[sym]]
    notional = float((rows["price"] * rows["qty"]).sum())
    return "%d %d %.2f" % (sym, len(rows), notional)
