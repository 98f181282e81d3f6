"""A serverless-style function: heavy init (numpy, pandas, a data set), then
a handler. Run with --cold to do init + handler in one go (a cold start);
otherwise it prepares itself with mitosis after init and every child forked
from it runs the handler on its inherited, already-loaded state."""
import json
import os
import sys
import time

T_START = time.time()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "client", "python"))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

rng = np.random.default_rng(42)
frame = pd.DataFrame({
    "user": rng.integers(0, 10_000, 1_000_000),
    "amount": rng.random(1_000_000) * 100,
})
T_READY = time.time()


def handler(event):
    """Top spender among a few users: reads the inherited frame."""
    users = event.get("users", [1, 2, 3])
    sub = frame[frame["user"].isin(users)]
    top = sub.groupby("user")["amount"].sum().sort_values(ascending=False)
    return {"top_user": int(top.index[0]), "total": round(float(top.iloc[0]), 2), "rows": len(frame)}


if "--cold" in sys.argv:
    t0 = float(sys.argv[sys.argv.index("--cold") + 1])
    out = handler({})
    print(json.dumps({"kind": "cold", "start_ms": (T_READY - t0) * 1000,
                      "total_ms": (time.time() - t0) * 1000, "result": out}), flush=True)
    sys.exit(0)

import mitosis  # noqa: E402

print(f"parent: init took {(T_READY - T_START) * 1000:.0f} ms; preparing", file=sys.stderr, flush=True)
role = mitosis.prepare("demo")
if role.is_parent:
    print(f"parent: seed {role.seed} ready", file=sys.stderr, flush=True)
    sys.stdout.write("PREPARED " + role.seed + "\n")
    sys.stdout.flush()
    while True:
        time.sleep(3600)
else:
    t_resume = time.time()
    event = role.payload or {}
    out = handler(event)
    print(json.dumps({"kind": "fork", "child": role.child,
                      "start_ms": (t_resume - event.get("t0", t_resume)) * 1000,
                      "total_ms": (time.time() - event.get("t0", t_resume)) * 1000,
                      "result": out}), flush=True)
    os._exit(0)  # a forked function exits without interpreter teardown
