/*
 * slowinit.c - a shared library for dlparent.c whose constructor blocks:
 * while it runs, the dlopen() that loads it holds the dynamic loader's
 * recursive lock (owner: the calling thread's tid). It raises
 * dlparent_in_init and waits until dlparent_release is set.
 */
#include <time.h>

extern volatile int dlparent_in_init, dlparent_release;

__attribute__((constructor)) static void slow_init(void)
{
	struct timespec ts = {0, 1000000};
	dlparent_in_init = 1;
	while (!dlparent_release)
		nanosleep(&ts, 0);
}
