"""Parent of the remote start benchmark (mitosis-bench -only remote).

As hello.py, but the child writes "T <ns>\\n" with its wall clock
(time.time_ns, clock_gettime(CLOCK_REALTIME) through the vDSO) as its first
act after resuming: the bench compares it with the time it took just before
sending the fork request (same host, same clock), so the child's start on
another node's daemon can be timed from its log file.
"""
import os
import signal
import time

orig = os.getpid()
print("READY", flush=True)
while True:
    os.kill(orig, signal.SIGSTOP)
    if os.getpid() != orig:
        os.write(1, b"T %d\n" % time.time_ns())
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        os.write(1, b"T %d\n" % time.time_ns())
        os._exit(0)
    os.waitpid(pid, 0)
