/*
 * alloc.c - the parent of the prepare-<size> benchmarks.
 *
 * usage: alloc MIB
 *
 * mallocs MIB MiB, writes every byte (so every page is present), prints
 * "READY" and stops itself with raise(SIGSTOP). The benchmark prepares it
 * while it is stopped; if it is ever continued it prints "RESUMED" and stops
 * again (the benchmark fails if it sees that line: Prepare must leave a
 * stopped parent stopped).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static unsigned char *volatile block;

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s MIB\n", argv[0]);
		return 2;
	}
	size_t n = (size_t)strtoul(argv[1], NULL, 10) << 20;
	block = malloc(n);
	if (block == NULL) {
		perror("malloc");
		return 1;
	}
	for (size_t i = 0; i < n; i++)
		block[i] = (unsigned char)(i * 13 + 1);
	printf("READY\n");
	fflush(stdout);
	for (;;) {
		raise(SIGSTOP);
		if (write(1, "RESUMED\n", 8) != 8)
			return 3;
	}
}
