"""json: serialize and deserialize a ~4 MB document (FunctionBench json_dumps_loads)."""
import json
import random

WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
CITIES = ["Lisbon", "Oslo", "Quito", "Hanoi", "Lagos", "Perth", "Lima", "Riga"]


def init(arg):
    rng = random.Random(1)
    recs = [
        {
            "id": i,
            "name": "user-%d" % i,
            "email": "u%d@example.com" % i,
            "score": round(rng.random() * 100, 6),
            "tags": [rng.choice(WORDS) for _ in range(5)],
            "active": rng.random() < 0.5,
            "address": {"city": rng.choice(CITIES), "zip": "%05d" % rng.randrange(100000)},
        }
        for i in range(20000)
    ]
    return {"records": recs, "version": 3}


def handler(doc):
    s = json.dumps(doc)
    obj = json.loads(s)
    return json.dumps(obj, sort_keys=True).encode()
