"""mitosis workflow step runtime: the handler.py of a workflow run's function.

The workflow runner (package workflow) deploys this file once per workflow
as a function (OpenFaaS classic template: module-level code is the init,
handle(req) serves one request) with the environment

    MITOSIS_WF_DIR      directory of the user's workflow module
    MITOSIS_WF_MODULE   its name (default "workflow")
    MITOSIS_WF_REDIS    unix socket path of the Redis server (storage)

so its seed holds the imported module. A request is one step instance, JSON:

    {"call": F, "name": STEP?, "item": X?, "after": [UPSTREAM...],
     "given": {UPSTREAM: [...]}?, "load": {UPSTREAM: KEY}?, "store": KEY?,
     "store_ttl": SECONDS?, "keep": true?, "source": true?, "input": I?}

or {"result_of": STEP, "load": {...}?}, which returns that step's result,
or (the fork transfer) {"init": [{"name": N, "call": F}...], "input": I},
which runs the run's source steps in order and keeps their results in this
process: the runner asks the gateway to keep that instance as the run's
stage seed (X-Mitosis-Stage), and every later instance of the run is its
child; it returns {"result": {N: MS}}, each step's time.

Arguments, in order: the workflow input (source steps), the map item (a
fan-out step), then each upstream's result in the order "after" lists them
(the runner puts the sources first): a fan-out upstream's list of its
instances' results from "given", else taken in place from this process
under fork, or GET + unpickled from Redis under storage. With "store" the
result is pickled and SET under KEY (expiring after store_ttl seconds, if
given) instead of returned; with "keep" (the
fork transfer) it stays in this process as STEP's result, for the runner
asks the gateway to keep this instance as a stage seed that the step's
downstream instances fork from. The reply is JSON: {"result": R},
{"stored": KEY, "bytes": N} or {"kept": STEP}, with "t": timings in ms.
"""

import importlib
import json
import os
import pickle
import sys
import time

sys.path.insert(0, os.environ["MITOSIS_WF_DIR"])
_wf = importlib.import_module(os.environ.get("MITOSIS_WF_MODULE") or "workflow")
_STATE = {}  # step name -> result: source and kept steps of this process's ancestry (fork transfer)

# Runner.SeedPerRun: a function of the run's own runs the sources here, in
# its initialization; its seed is the run's.
_INPUT = json.loads(os.environ.get("MITOSIS_WF_INPUT") or "null")
for _st in json.loads(os.environ.get("MITOSIS_WF_INIT") or "[]"):
    _STATE[_st["name"]] = getattr(_wf, _st["call"])(_INPUT)


def _ms(t0):
    return (time.perf_counter() - t0) * 1000


_redis = None


def _store():
    global _redis
    if _redis is None:
        import redis  # lazily: a socket opened at init could not be forked

        _redis = redis.Redis(unix_socket_path=os.environ["MITOSIS_WF_REDIS"])
    return _redis


def _upstream(name, load, t):
    if name in _STATE:
        return _STATE[name]
    if name not in load:
        raise KeyError("upstream step %r: not in this instance and no storage key given" % name)
    t0 = time.perf_counter()
    blob = _store().get(load[name])
    t["load_ms"] += _ms(t0)
    if blob is None:
        raise KeyError("upstream step %r: storage key %s is missing" % (name, load[name]))
    t["bytes_in"] += len(blob)
    t0 = time.perf_counter()
    obj = pickle.loads(blob)
    t["deser_ms"] += _ms(t0)
    return obj


def handle(req):
    r = json.loads(req)
    t = {"load_ms": 0.0, "deser_ms": 0.0, "ser_ms": 0.0, "store_ms": 0.0, "bytes_in": 0}
    if "init" in r:
        took = {}
        for st in r["init"]:
            t0 = time.perf_counter()
            _STATE[st["name"]] = getattr(_wf, st["call"])(r.get("input"))
            took[st["name"]] = _ms(t0)
        return json.dumps({"result": took, "t": t})
    args = []
    if r.get("source"):
        args.append(r.get("input"))
    if "item" in r:
        args.append(r["item"])
    load = r.get("load") or {}
    if r.get("result_of"):  # the runner reads a step's (list) result to fan out over it
        return json.dumps({"result": _upstream(r["result_of"], load, t), "t": t})
    given = r.get("given") or {}
    for name in r.get("after") or []:
        args.append(given[name] if name in given else _upstream(name, load, t))
    t0 = time.perf_counter()
    out = getattr(_wf, r["call"])(*args)
    t["run_ms"] = _ms(t0)
    if r.get("keep"):
        _STATE[r["name"]] = out
        return json.dumps({"kept": r["name"], "t": t})
    key = r.get("store")
    if key:
        t0 = time.perf_counter()
        blob = pickle.dumps(out, protocol=5)
        t["ser_ms"] = _ms(t0)
        t0 = time.perf_counter()
        _store().set(key, blob, ex=r.get("store_ttl") or None)
        t["store_ms"] = _ms(t0)
        return json.dumps({"stored": key, "bytes": len(blob), "t": t})
    return json.dumps({"result": out, "t": t})
