/*
 * threads.c - the C parent of the threads benchmark (issue #10:
 * multi-threaded parents).
 *
 * usage: threads N        (1 <= N <= 256)
 *
 * Starts N-1 worker threads, so the process has N threads; each loops on
 * its own counter with a 1 ms nanosleep between increments. Once every
 * worker has counted at least once the main thread prints "READY" and
 * loops: raise(SIGSTOP) (the prepare point; the signal stops the whole
 * thread group); on resuming,
 *   - a mitosis child (getpid() differs from the pid before the stop)
 *     writes "x" to fd 1 (what the benchmark times), then checks its
 *     threads, untimed: /proc/self/task lists N tasks and every worker's
 *     counter moves on within 5 s. It prints "THREADS <N> ok" or
 *     "THREADS FAIL <detail>" and _exits 0;
 *   - the parent itself (continued by SIGCONT: the local-fork baseline)
 *     fork()s a child that writes "x" and _exits (fork(2) copies only the
 *     calling thread), waits for it and stops again.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXN 256

/* One counter per worker, each on its own cache line. */
static struct {
	_Atomic unsigned long n;
	char pad[64 - sizeof(unsigned long)];
} count[MAXN];

static _Atomic int started;

static void sleep_ns(long ns)
{
	struct timespec ts = {ns / 1000000000L, ns % 1000000000L};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static void *worker(void *arg)
{
	int t = (int)(long)arg;
	atomic_fetch_add(&count[t].n, 1);
	atomic_fetch_add(&started, 1);
	for (;;) {
		sleep_ns(1000000);
		atomic_fetch_add(&count[t].n, 1);
	}
	return NULL;
}

static int tasks(void)
{
	DIR *d = opendir("/proc/self/task");
	if (d == NULL)
		return -1;
	int n = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL)
		if (e->d_name[0] != '.')
			n++;
	closedir(d);
	return n;
}

/* check runs in a mitosis child after it wrote its result. */
static void check(int nthreads)
{
	char msg[160] = "";
	int nt = tasks();
	if (nt != nthreads)
		snprintf(msg, sizeof msg, "%d tasks in /proc/self/task, want %d", nt, nthreads);
	unsigned long before[MAXN];
	for (int t = 1; t < nthreads; t++)
		before[t] = atomic_load(&count[t].n);
	for (int t = 1; !msg[0] && t < nthreads; t++) {
		int waited = 0;
		while (atomic_load(&count[t].n) == before[t]) {
			if (++waited > 5000) {
				snprintf(msg, sizeof msg, "worker %d's counter stuck at %lu for 5 s", t, before[t]);
				break;
			}
			sleep_ns(1000000);
		}
	}
	char out[200];
	int n;
	if (msg[0])
		n = snprintf(out, sizeof out, "THREADS FAIL %s\n", msg);
	else
		n = snprintf(out, sizeof out, "THREADS %d ok\n", nthreads);
	if (write(1, out, (size_t)n) != n)
		_exit(3);
}

int main(int argc, char **argv)
{
	int nthreads = argc == 2 ? atoi(argv[1]) : 0;
	if (nthreads < 1 || nthreads > MAXN) {
		fprintf(stderr, "usage: %s N (1..%d threads in all)\n", argv[0], MAXN);
		return 2;
	}
	for (int t = 1; t < nthreads; t++) {
		pthread_t th;
		int e = pthread_create(&th, NULL, worker, (void *)(long)t);
		if (e != 0) {
			fprintf(stderr, "pthread_create: %s\n", strerror(e));
			return 1;
		}
	}
	while (atomic_load(&started) < nthreads - 1)
		sleep_ns(100000);
	pid_t orig = getpid();
	printf("READY\n");
	fflush(stdout);
	for (;;) {
		raise(SIGSTOP);
		if (getpid() != orig) {
			if (write(1, "x", 1) != 1)
				_exit(3);
			check(nthreads);
			_exit(0);
		}
		pid_t c = fork();
		if (c < 0) {
			perror("fork");
			_exit(2);
		}
		if (c == 0) {
			if (write(1, "x", 1) != 1)
				_exit(3);
			_exit(0);
		}
		int st;
		while (waitpid(c, &st, 0) < 0)
			;
	}
}
