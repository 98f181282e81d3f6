"""mem:N: a parent holding N MiB of written memory (the prepare-vs-size benchmark)."""
import hashlib


def init(arg):
    return b"\xa5" * (int(arg) << 20)


def handler(buf):
    return hashlib.sha256(buf[::4096]).digest()
