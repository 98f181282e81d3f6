"""Map-reduce word count: load_corpus builds a corpus of generated
documents (Python strings), list_shards names the shards, count counts the
words of one shard's documents, reduce_counts merges the counts.
Input: {"docs": D, "shards": S}."""
import collections
import random

WORDS = ["w%03d" % i for i in range(500)]


def load_corpus(inp):
    rng = random.Random(42)
    n = int(inp.get("docs", 20000))
    return [" ".join(rng.choices(WORDS, weights=range(1, len(WORDS) + 1), k=50)) for _ in range(n)]


def list_shards(inp):
    s = int(inp.get("shards", 8))
    return [{"shard": i, "of": s} for i in range(s)]


def count(shard, corpus):
    c = collections.Counter()
    for doc in corpus[shard["shard"]::shard["of"]]:
        c.update(doc.split())
    return dict(c)


def reduce_counts(counts):
    total = collections.Counter()
    for c in counts:
        total.update(c)
    top = sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    return {"words": sum(total.values()), "distinct": len(total), "top": top}
