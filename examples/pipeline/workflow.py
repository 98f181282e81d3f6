"""ML inference pipeline, a chain of steps that hand numpy arrays on:
load_model builds a linear classifier (a projection and weights),
load_samples the raw feature rows; preprocess standardizes the rows and
project reduces them with the model's projection (each returns a float64
matrix: state no JSON could carry); list_shards names the shards, infer
classifies one shard of the projected rows, tally merges the shards'
class counts.

Under the fork transfer preprocess and project are kept as stage seeds:
project is forked from preprocess's instance and every infer instance from
project's, so each takes its upstream's array in place. Under storage each
array is pickled into Redis and unpickled downstream.

Input: {"samples": N, "features": F, "classes": K, "shards": S,
"fail": STEP?} (STEP raises, to test failures)."""
import hashlib

import numpy as np


def _fail(model, step):
    if model["fail"] == step:
        raise ValueError("pipeline step %s: failing as the input asked" % step)


def load_model(inp):
    f = int(inp.get("features", 32))
    k = int(inp.get("classes", 10))
    rng = np.random.default_rng(7)
    return {
        "projection": rng.standard_normal((f, max(f // 2, 1))),
        "weights": rng.standard_normal((max(f // 2, 1), k)),
        "bias": rng.standard_normal(k),
        "fail": inp.get("fail"),
    }


def load_samples(inp):
    n = int(inp.get("samples", 60000))
    f = int(inp.get("features", 32))
    rng = np.random.default_rng(11)
    scale = rng.uniform(0.5, 4.0, f)
    shift = rng.uniform(-3.0, 3.0, f)
    return rng.standard_normal((n, f)) * scale + shift


def list_shards(inp):
    s = int(inp.get("shards", 6))
    return [{"shard": i, "of": s} for i in range(s)]


def preprocess(samples):
    return (samples - samples.mean(axis=0)) / samples.std(axis=0)


def project(model, features):
    _fail(model, "project")
    return features @ model["projection"]


def infer(shard, model, projected):
    _fail(model, "infer")
    rows = np.ascontiguousarray(projected[shard["shard"]::shard["of"]])
    labels = (rows @ model["weights"] + model["bias"]).argmax(axis=1)
    return {
        "shard": shard["shard"],
        "rows": int(len(rows)),
        "counts": np.bincount(labels, minlength=len(model["bias"])).tolist(),
        "digest": hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest()[:16],
    }


def tally(results):
    results = sorted(results, key=lambda r: r["shard"])
    counts = [sum(c) for c in zip(*(r["counts"] for r in results))]
    h = hashlib.sha256()
    for r in results:
        h.update(r["digest"].encode())
    return {"rows": sum(r["rows"] for r in results), "counts": counts, "digest": h.hexdigest()[:16]}
