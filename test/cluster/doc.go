// Package cluster holds the multi-node end-to-end test of mitosis: every
// test builds its own three-node cluster on this host with bench/netlab
// (one network namespace per node, veths on a bridge in a hub namespace,
// addresses in 198.18.0.0/24, one `mitosis daemon` per namespace) and drives
// it through the CLI and the Python client as a user would: remote forks
// with the node page cache, forwarding from a third node, a grandchild
// forked from a child prepared on another node, an origin that dies or is
// cut off while its children fault, and a node with the wrong secret.
//
// The tests need root, the ip tool and /usr/bin/python3 with numpy and
// pandas; they skip otherwise (or with MITOSIS_CLUSTER=0). Nothing is
// routed out of the namespaces, every name carries a random "mt" prefix,
// and everything is removed at the end even on failure. The whole package
// runs in well under 3 minutes (about 10 s here):
//
//	go test ./test/cluster -count=1 -v -timeout 5m
package cluster
