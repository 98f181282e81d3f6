/*
 * array_ts.c - the parent of the remote array benchmark: array.c whose
 * work() also prints the wall clock (CLOCK_REALTIME, ns) at its end, so the
 * end of a child whose output goes to a log file on another node can be
 * timed: it writes "SUM <n> <ns>\n".
 *
 * usage: array_ts      fill the 64 MiB array, print "READY", then loop:
 *                      raise(SIGSTOP); a mitosis child (new pid) runs work()
 *                      and exits; the parent itself (SIGCONT) forks a child
 *                      that runs work(), waits for it and stops again.
 */
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define N ((size_t)64 << 20)

static unsigned char *a;

static void work(void)
{
	uint64_t s = 0;
	for (size_t i = 0; i < N; i++)
		s += a[i];
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	char buf[96];
	int n = snprintf(buf, sizeof buf, "SUM %llu %lld\n", (unsigned long long)s,
			 (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
	if (write(1, buf, (size_t)n) != n)
		_exit(3);
}

int main(void)
{
	a = malloc(N);
	if (a == NULL) {
		perror("malloc");
		return 1;
	}
	for (size_t i = 0; i < N; i++)
		a[i] = (unsigned char)(i * 7 + (i >> 12));
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
