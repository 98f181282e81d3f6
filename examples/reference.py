"""Runs a workflow's steps in one process, in order, and prints the sink's
result as JSON: the reference the fork and storage runs are checked
against.  python3 examples/reference.py SPEC.json '{"trades": ...}'"""
import importlib
import json
import os
import sys

spec_path, inp = sys.argv[1], json.loads(sys.argv[2])
spec = json.load(open(spec_path))
d = spec.get("dir", ".")
if not os.path.isabs(d):
    d = os.path.join(os.path.dirname(os.path.abspath(spec_path)), d)
sys.path.insert(0, d)
wf = importlib.import_module(spec.get("module", "workflow"))
steps = {s["name"]: s for s in spec["steps"]}
res = {}
used = set()
for s in spec["steps"]:
    used.update(s.get("after", []))
    if s.get("map"):
        used.add(s["map"])
for s in spec["steps"]:  # definitions list steps after their upstreams
    fn = getattr(wf, s.get("call") or s["name"].replace("-", "_"))
    after = s.get("after", [])
    if not after:
        res[s["name"]] = fn(inp)
        continue
    src = [res[a] for a in after if not steps[a].get("after")]
    extra = [res[a] for a in after if steps[a].get("after")]
    if s.get("map"):
        res[s["name"]] = [fn(item, *src, *extra) for item in res[s["map"]]]
    else:
        res[s["name"]] = fn(*src, *extra)
sink = [s["name"] for s in spec["steps"] if s["name"] not in used][0]
print(json.dumps(res[sink], sort_keys=True))
