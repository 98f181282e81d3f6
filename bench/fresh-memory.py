"""How long touching fresh memory takes on this host, right after freeing the
same amount and after a pause: with virtio-balloon free page reporting, blocks
left free for a couple of seconds go back to the hypervisor and the next touch
of one costs a host fault (BENCHMARKS.md, workflows).

Usage: python3 bench/fresh-memory.py [MiB]   (default 512)
"""
import ctypes
import mmap
import sys
import time

libc = ctypes.CDLL("libc.so.6")
MADV_HUGEPAGE = 14


def touch(n):
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(n), MADV_HUGEPAGE)
    t = time.perf_counter()
    for i in range(0, n, 4096):
        m[i] = 1
    return m, (time.perf_counter() - t) * 1000


def main():
    n = int(sys.argv[1] if len(sys.argv) > 1 else 512) << 20
    m, _ = touch(n)  # warm-up
    del m
    for pause in (0, 3, 0, 3, 0, 3):
        time.sleep(pause)
        m, ms = touch(n)
        del m
        print("after a %d s pause: %.0f ms to touch %d MiB" % (pause, ms, n >> 20))


if __name__ == "__main__":
    main()
