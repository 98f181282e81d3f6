"""mitosis client library: prepare the calling process into a seed.

Usage::

    import mitosis

    role = mitosis.prepare(name="worker")
    if role.is_parent:
        print("seed", role.seed)          # fork children with `mitosis fork worker`
    else:
        print("child", role.child, "payload", role.payload)

prepare() connects to the mitosis daemon, asks it to snapshot this process
("prepare-self", see docs/PROTOCOL.md) and blocks in a plain read() on the
connection. The parent returns once the seed exists; every child forked from
the seed resumes inside that same read, on a fresh connection installed at the
same fd number, and returns with role "child".

The process may have other threads (numpy's and pandas' pools, a
concurrent.futures pool): children get them all, each resuming where it was.
Standard library only.
"""

import json
import os
import socket
from collections import namedtuple

__all__ = ["prepare", "exit", "Role", "MitosisError", "DEFAULT_SOCKET"]

DEFAULT_SOCKET = "/run/mitosis/mitosis.sock"
_MAX_REPLY = 64 << 20


class MitosisError(Exception):
    """An error reported by the mitosis daemon, or failing to reach it."""


class Role(namedtuple("Role", ["role", "seed", "child", "payload"])):
    """What prepare() returns.

    role: "parent" or "child"; seed: the seed id; child: the child id (None
    in the parent); payload: the JSON payload given to `mitosis fork
    --payload`, decoded (None if none, and always None in the parent).
    """

    __slots__ = ()

    @property
    def is_parent(self):
        """True in the prepared process itself."""
        return self.role == "parent"

    @property
    def is_child(self):
        """True in a child forked from the seed."""
        return self.role == "child"


def _socket_path(socket_path):
    return socket_path or os.environ.get("MITOSIS_SOCKET") or DEFAULT_SOCKET


def _shed():
    """Collect garbage, freeze the survivors and trim the C heap (see prepare).

    function/bootstrap.py has the same steps: it is installed alone into
    function roots, so it cannot import this module. Keep them in step.
    """
    import gc

    gc.collect()
    if hasattr(gc, "freeze"):  # Python 3.7+
        gc.freeze()
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (ImportError, OSError, AttributeError):  # no ctypes, or not glibc
        pass


def prepare(name=None, socket_path=None, lean=True):
    """Prepare this process into a seed; return a Role (parent or child).

    socket_path defaults to $MITOSIS_SOCKET, else /run/mitosis/mitosis.sock.
    Raises MitosisError if the daemon cannot be reached or refuses.

    lean (default True) first runs gc.collect(), gc.freeze() and glibc's
    malloc_trim(0): the seed then carries no garbage and no freed heap
    (children would page it in, and copy it where they allocate), and a
    child's collections skip the objects it inherited instead of touching
    every one. The parent unfreezes them when prepare returns; children keep
    them frozen. Pass lean=False to snapshot the process exactly as it is.
    """
    if lean:
        _shed()
    try:
        role = _prepare(name, socket_path)
    except BaseException:
        if lean:
            _unfreeze()
        raise
    if lean and role.is_parent:
        _unfreeze()
    return role


def _unfreeze():
    import gc

    if hasattr(gc, "unfreeze"):
        gc.unfreeze()


def _prepare(name, socket_path):
    path = _socket_path(socket_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise MitosisError(
            "cannot reach mitosis daemon at %s: %s (start it with `mitosis daemon`)" % (path, e)
        ) from None
    fd = sock.fileno()
    try:
        req = {"op": "prepare-self", "fd": fd}
        if name:
            req["name"] = name
        sock.sendall(json.dumps(req, separators=(",", ":")).encode() + b"\n")
        # Plain read() on the raw fd: the daemon snapshots us while we are
        # blocked here, and children resume in this very call.
        buf = b""
        while b"\n" not in buf:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise MitosisError("mitosis daemon at %s closed the connection without a reply" % path)
            buf += chunk
            if len(buf) > _MAX_REPLY:
                raise MitosisError("reply from mitosis daemon is too long")
    except OSError as e:
        raise MitosisError("prepare-self via %s: %s" % (path, e)) from None
    finally:
        # In a child, fd is the fresh connection the daemon installed; in
        # both roles we are done with it.
        sock.detach()
        try:
            os.close(fd)
        except OSError:
            pass
    line = buf.split(b"\n", 1)[0]
    try:
        reply = json.loads(line)
    except ValueError as e:
        raise MitosisError("malformed reply from mitosis daemon: %s" % e) from None
    if not isinstance(reply, dict):
        raise MitosisError("malformed reply from mitosis daemon: %r" % line[:200])
    if not reply.get("ok"):
        raise MitosisError(reply.get("error") or "mitosis daemon reported failure without a message")
    role = reply.get("role")
    if role not in ("parent", "child"):
        raise MitosisError("reply from mitosis daemon has no valid role: %r" % line[:200])
    return Role(role=role, seed=reply.get("seed"), child=reply.get("child"), payload=reply.get("payload"))


def exit(code=0):
    """End this process now: run the atexit handlers, flush stdout and
    stderr, then os._exit(code), skipping the interpreter's teardown.

    Meant for a child that has done its work. The teardown frees every
    object the process holds, so in a child it walks (and copies on write)
    much of the memory it inherited from the seed: for a Python hello it is
    most of the time from the result to the exit (BENCHMARKS.md, "the fork
    path as users see it"). Files the child opened and did not close are
    not flushed: close them (or use `with`) before calling exit.
    """
    import atexit
    import sys
    try:
        atexit._run_exitfuncs()
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                if f is not None:
                    f.flush()
            except Exception:
                pass
        os._exit(code)
