#!/usr/bin/python3
"""A parent holding a listening TCP socket: mitosis must refuse to prepare it.

Prints "READY <pid> <port>", then answers each SIGUSR1 with "PONG <n>".
Exits by itself after 300 s.
"""
import os
import signal
import socket
import sys
import time

flag = [0]


def on_usr1(signum, frame):
    flag[0] += 1


def main():
    signal.signal(signal.SIGUSR1, on_usr1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(4)
    print("READY %d %d" % (os.getpid(), s.getsockname()[1]), flush=True)
    seen = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.05)
        while seen < flag[0]:
            seen += 1
            print("PONG %d" % seen, flush=True)
    s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
