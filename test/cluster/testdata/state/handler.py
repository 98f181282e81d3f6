# A function whose initialization allocates STATE_MB MiB of numpy state
# (TestInvocationCPU): "touch" sums all of it, anything else answers at
# once without reading it.
import os

import numpy as np

MB = int(os.environ.get("STATE_MB", "0"))
STATE = np.arange(MB * (1 << 20) // 8, dtype=np.int64)


def handle(req):
    if req == "touch":
        return str(int(STATE.sum()))
    return "ok"
