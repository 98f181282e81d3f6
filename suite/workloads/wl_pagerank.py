"""pagerank: PageRank of a 100k-node Barabasi-Albert graph with python-igraph (FunctionBench graph_pagerank)."""
import random

import igraph


def init(arg):
    random.seed(5)  # igraph draws from Python's random module
    return igraph.Graph.Barabasi(100000, 3)


def handler(g):
    pr = g.pagerank()
    return ",".join("%.10e" % x for x in pr).encode()
