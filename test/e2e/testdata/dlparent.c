/*
 * dlparent.c - a parent whose second thread is inside dlopen() at the
 * prepare point, holding the dynamic loader's recursive lock.
 *
 * usage: dlparent LIBSLOWINIT LIBOTHER
 *
 * A thread dlopen()s LIBSLOWINIT, whose constructor waits (see slowinit.c);
 * once it waits, the main thread prints "READY <pid>" and loops until it is
 * a child (getpid() changed) or gets SIGUSR1 (prepare it from outside in
 * between). Then it releases the constructor, joins the thread (whose
 * dlopen returns and unlocks the loader's lock: the owner must be this
 * process's thread) and dlopen()s LIBOTHER, which takes the same lock:
 *   ROLE parent|child <pid>
 *   DLOPEN ok | DLOPEN FAIL <what>
 * alarm(10) turns a hang (the lock never released) into SIGALRM.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>

volatile int dlparent_in_init, dlparent_release;
static volatile sig_atomic_t usr1;
static pid_t first_pid;
static const char *slow_lib;

static void on_usr1(int s) { (void)s; usr1 = 1; }

static void *loader(void *arg)
{
	(void)arg;
	return dlopen(slow_lib, RTLD_NOW);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: dlparent LIBSLOWINIT LIBOTHER\n");
		return 2;
	}
	slow_lib = argv[1];
	first_pid = getpid();
	signal(SIGUSR1, on_usr1);
	pthread_t th;
	if (pthread_create(&th, NULL, loader, NULL) != 0)
		return 1;
	struct timespec ms = {0, 1000000};
	while (!dlparent_in_init)
		nanosleep(&ms, 0);
	printf("READY %d\n", (int)getpid());
	fflush(stdout);
	while (getpid() == first_pid && !usr1)
		nanosleep(&ms, 0);
	alarm(10);
	printf("ROLE %s %d\n", getpid() == first_pid ? "parent" : "child", (int)getpid());
	fflush(stdout);
	dlparent_release = 1;
	void *h = NULL;
	pthread_join(th, &h);
	if (!h) {
		printf("DLOPEN FAIL %s: %s\n", slow_lib, dlerror());
		return 1;
	}
	if (!dlopen(argv[2], RTLD_NOW)) {
		printf("DLOPEN FAIL %s: %s\n", argv[2], dlerror());
		return 1;
	}
	printf("DLOPEN ok\n");
	return 0;
}
