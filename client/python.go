package client

import _ "embed"

// PythonModule is the Python client module (client/python/mitosis.py), for
// tools that run Python parents from elsewhere: write it next to the
// program as mitosis.py.
//
//go:embed python/mitosis.py
var PythonModule []byte
