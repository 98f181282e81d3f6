/*
 * threads.c - a multi-threaded parent: mitosis must refuse to prepare it.
 *
 * A second thread sleeps; the main thread prints "READY <pid>", then answers
 * each SIGUSR1 with a line "PONG <n>". It exits by itself after 300 s.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

static void *sleeper(void *arg)
{
	(void)arg;
	for (;;)
		sleep(1);
	return NULL;
}

int main(void)
{
	sigset_t set;
	pthread_t th;
	setvbuf(stdout, NULL, _IOLBF, 0);
	sigemptyset(&set);
	sigaddset(&set, SIGUSR1);
	/* blocked in every thread: the main thread takes it with sigtimedwait */
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	if (pthread_create(&th, NULL, sleeper, NULL) != 0) {
		printf("ERROR pthread_create\n");
		return 2;
	}
	printf("READY %d\n", (int)getpid());
	fflush(stdout);
	struct timespec one = {1, 0};
	int pongs = 0;
	for (int i = 0; i < 300; i++) {
		if (sigtimedwait(&set, NULL, &one) == SIGUSR1)
			printf("PONG %d\n", ++pongs);
	}
	return 0;
}
