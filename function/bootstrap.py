"""mitosis function runtime for Python (OpenFaaS classic python3 contract).

A function is a directory with handler.py (or function/handler.py): its
module-level code is the function's initialization, and handle(req) serves
one request (req is the request body as str; the return value, and whatever
handle prints to stdout, is the response body).

The node daemon starts this file as

    python3 bootstrap.py MODE FUNCTION_DIR NAME

with $MITOSIS_STATUS_FD naming a unix stream socket connected to the daemon.
MODE is

    seed   run the initialization, report it on the status socket, close it,
           then prepare this process into the function's seed through the
           daemon ($MITOSIS_SOCKET). Every invocation is a child forked from
           the seed: it resumes inside prepare() with the request as its
           payload, calls handle, writes one response line on its channel and
           exits at once (os._exit: no interpreter teardown). A request with
           "seed_name" (the node sets it for a stage, function.Request) is
           kept instead: after a 200 answer the child prepares itself as a
           seed of that name, and its children serve requests likewise.
    serve  run the initialization, report it, then serve requests read from
           the status socket one line at a time until it closes (a warm
           instance of the keep-alive policy; the cold policy sends one).

Wire format (one JSON object per line, see function/wire.go):
    status  {"ready": true, "init_ms": F} | {"ready": false, "error": LAST_TRACEBACK_LINE, "traceback": TEXT}
    request {"body": BASE64, "method": M, "path": P, "query": Q, "headers": {K: V}}
    reply   {"status": 200, "body": BASE64, "content_type": CT} | {"status": 500, "error": LAST_LINE, "traceback": TEXT}

Standard library only; nothing here runs between requests.
"""

import base64
import io
import json
import os
import signal
import socket
import sys
import time
import traceback

_MAX_LINE = 64 << 20


def _last_line(exc):
    lines = traceback.format_exception_only(type(exc), exc)
    text = "".join(lines).strip().splitlines()
    return text[-1] if text else type(exc).__name__


def _tb(exc):
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8192:]


def _send(fd, obj):
    data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class _Lines:
    """Reads newline-terminated lines from a raw fd without buffering past them."""

    def __init__(self, fd):
        self.fd = fd
        self.buf = b""

    def next(self):
        while b"\n" not in self.buf:
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return None
            self.buf += chunk
            if len(self.buf) > _MAX_LINE:
                raise ValueError("request line longer than %d bytes" % _MAX_LINE)
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def _load(fdir):
    for sub in ("", "function"):
        d = os.path.join(fdir, sub) if sub else fdir
        if os.path.isfile(os.path.join(d, "handler.py")):
            break
    else:
        raise FileNotFoundError("no handler.py in %s (nor in %s/function)" % (fdir, fdir))
    sys.path.insert(0, d)
    if d != fdir:
        sys.path.insert(1, fdir)
    os.chdir(d)
    import handler  # noqa: the function's initialization runs here

    fn = getattr(handler, "handle", None)
    if not callable(fn):
        raise AttributeError("handler.py defines no handle(req) function")
    return fn


_HEADER_ENV = str.maketrans("-", "_")


def _run(handle, req):
    """Serve one request; return the reply object."""
    try:
        body = base64.b64decode(req.get("body") or "")
        try:
            text = body.decode()
        except UnicodeDecodeError:
            text = body.decode("latin-1")
        # The classic watchdog's environment for the handler.
        os.environ["Http_Method"] = req.get("method") or "POST"
        os.environ["Http_Path"] = req.get("path") or "/"
        os.environ["Http_Query"] = req.get("query") or ""
        for k, v in (req.get("headers") or {}).items():
            os.environ["Http_" + k.translate(_HEADER_ENV)] = v
        out = io.StringIO()
        saved = sys.stdout
        sys.stdout = out
        try:
            ret = handle(text)
        finally:
            sys.stdout = saved
        printed = out.getvalue()
        if isinstance(ret, (bytes, bytearray)):
            payload = printed.encode() + bytes(ret)
        elif ret is None:
            payload = printed.encode()
        else:
            payload = (printed + str(ret) + "\n").encode()
        return {"status": 200, "body": base64.b64encode(payload).decode(), "content_type": "text/plain; charset=utf-8"}
    except BaseException as e:  # the caller gets the error, never a hang
        return {"status": 500, "error": _last_line(e), "traceback": _tb(e)}


def _shed():
    """Make the process lean before it becomes the seed.

    gc.collect() drops the initialization's garbage; gc.freeze() moves the
    survivors to the permanent generation, so a child's collections skip
    the inherited objects instead of walking (paging in, and writing the GC
    headers of, hence copying) every one of them; malloc_trim(0) hands the
    allocator's free memory back to the kernel. Freed heap is otherwise
    present memory of the seed: children page it in and, when they
    allocate there, copy it on first write for nothing (a pandas init
    leaves half its heap free: the FINRA seed went from 404 to 197 MB of
    RSS, and a rule child maps 38% fewer pages). client/python/mitosis.py
    does the same in prepare(); this file is installed alone into function
    roots and cannot import it, so the steps are kept in step by hand.
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


def _prepare(name, path=None):
    """prepare-self through the daemon; keeps the connection in a child."""
    path = path or os.environ.get("MITOSIS_SOCKET") or "/run/mitosis/mitosis.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    fd = sock.detach()
    _send(fd, {"op": "prepare-self", "name": name, "fd": fd})
    # Plain read(): the daemon snapshots this process while it blocks here
    # and every child resumes in this very call, on a fresh connection
    # installed at the same fd number.
    line = _Lines(fd).next()
    if line is None:
        raise RuntimeError("mitosis daemon closed the connection during prepare")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error") or "prepare failed")
    return fd, reply


def main(argv):
    if len(argv) != 4 or argv[1] not in ("seed", "serve"):
        sys.stderr.write("usage: bootstrap.py seed|serve FUNCTION_DIR NAME\n")
        return 2
    mode, fdir, name = argv[1], argv[2], argv[3]
    status = int(os.environ.pop("MITOSIS_STATUS_FD"))
    t0 = time.monotonic()
    try:
        handle = _load(fdir)
    except BaseException as e:
        _send(status, {"ready": False, "error": _last_line(e), "traceback": _tb(e)})
        return 1
    _send(status, {"ready": True, "init_ms": (time.monotonic() - t0) * 1000})
    if mode == "serve":
        lines = _Lines(status)
        while True:
            line = lines.next()
            if line is None:
                return 0
            _send(status, _run(handle, json.loads(line)))
    # seed: the status socket must not reach the seed (sockets are not
    # carried into children).
    os.close(status)
    _shed()
    fd, reply = _prepare(name)
    if reply.get("role") == "parent":
        os.close(fd)
        while True:
            signal.pause()
    # A child: the payload is the request; answer on the channel and go,
    # unless the node asked to keep this instance as a stage seed: then,
    # once it answered 200, it prepares itself under the name the node gave
    # and its own children (later invocations naming that seed) resume
    # there with their requests.
    while True:
        try:
            payload = reply.get("payload") or {}
            resp = _run(handle, payload)
            _send(fd, resp)
            stage = payload.get("seed_name")
            if not stage or resp.get("status") != 200:
                os._exit(0)
            os.close(fd)  # a connected socket cannot be carried into children
            _shed()
            # On the daemon of the node this instance runs on: the
            # environment names the seed's node.
            fd, reply = _prepare(stage, payload.get("socket"))
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        if reply.get("role") == "parent":
            os.close(fd)
            while True:
                signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
