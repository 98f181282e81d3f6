/*
 * array.c - the parent of the array64 benchmark.
 *
 * usage: array        the parent: fill the array, print "READY", then loop:
 *                     raise(SIGSTOP); on resuming, a mitosis child (getpid()
 *                     differs from the pid before the stop) runs work() and
 *                     exits; the parent itself (continued by SIGCONT, the
 *                     local-fork baseline) forks a child that runs work(),
 *                     waits for it and stops again.
 *        array once   exec-from-scratch baseline: fill, work(), exit.
 *
 * The array is 64 MiB of malloc'd memory with a[i] = (uint8)(i*7 + (i>>12));
 * work() sums every byte (so it reads every page) and writes "SUM <n>\n" to
 * fd 1 with write(2).
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#define N ((size_t)64 << 20)

static unsigned char *a;

static void init(void)
{
	a = malloc(N);
	if (a == NULL) {
		perror("malloc");
		exit(1);
	}
	for (size_t i = 0; i < N; i++)
		a[i] = (unsigned char)(i * 7 + (i >> 12));
}

static void work(void)
{
	uint64_t s = 0;
	for (size_t i = 0; i < N; i++)
		s += a[i];
	char buf[64];
	int n = snprintf(buf, sizeof buf, "SUM %llu\n", (unsigned long long)s);
	if (write(1, buf, (size_t)n) != n)
		_exit(3);
}

int main(int argc, char **argv)
{
	if (argc > 1 && strcmp(argv[1], "once") == 0) {
		init();
		work();
		return 0;
	}
	init();
	pid_t orig = getpid();
	printf("READY\n");
	fflush(stdout);
	for (;;) {
		raise(SIGSTOP);
		if (getpid() != orig) {
			work();
			_exit(0);
		}
		pid_t c = fork();
		if (c < 0) {
			perror("fork");
			_exit(2);
		}
		if (c == 0) {
			work();
			_exit(0);
		}
		int st;
		while (waitpid(c, &st, 0) < 0)
			;
	}
}
