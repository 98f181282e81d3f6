"""Parent of the start-python-hello benchmark.

Prints READY, then loops: stop itself with SIGSTOP; on resuming, a mitosis
child (its pid differs from the one before the stop) writes "x" to fd 1 and
exits; the parent itself (continued by SIGCONT: the local-fork baseline)
forks a child that writes "x" and exits, waits for it and stops again.
"""
import os
import signal

orig = os.getpid()
print("READY", flush=True)
while True:
    os.kill(orig, signal.SIGSTOP)
    if os.getpid() != orig:
        os.write(1, b"x")
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        os.write(1, b"x")
        os._exit(0)
    os.waitpid(pid, 0)
