"""leanparent.py - a Python parent with a large hole of freed heap.

usage: leanparent.py NAME lean|exact

Allocates 96 MiB as 1 KiB bytes objects (each a malloc chunk in the C
heap), then frees the first 80 MiB of them, keeping the rest (so the heap
cannot shrink from its top), then calls mitosis.prepare(NAME,
lean=(mode == "lean")). Prints
    ROLE parent|child SEED
    FROZEN N        gc.get_freeze_count() after prepare returned
    KEPT N          how many kept objects still hold their bytes
and then, in the parent, waits for stdin to close; a child exits 0.
"""
import gc
import sys

import mitosis

name, mode = sys.argv[1], sys.argv[2]
objs = [bytes([i % 251]) * 1024 for i in range(96 * 1024)]
kept = objs[80 * 1024:]
del objs
role = mitosis.prepare(name, lean=(mode == "lean"))
print("ROLE", role.role, role.seed, flush=True)
print("FROZEN", gc.get_freeze_count(), flush=True)
ok = sum(1 for j, b in enumerate(kept) if b == bytes([(80 * 1024 + j) % 251]) * 1024)
print("KEPT", ok, flush=True)
if role.is_parent:
    sys.stdin.read()
else:
    mitosis.exit(0)
