/*
 * parent.c - the C parent of the mitosis end-to-end tests.
 *
 * Built twice by the tests: gcc -O1 -static and gcc -O1 (dynamic).
 *
 * usage: parent FILE [--isolate] [--hold]
 *
 * Before the prepare point it builds deterministic state (a 100k-entry
 * open-addressing hash table and a 64 MiB array in malloc'd memory, .data and
 * .bss arrays, a few regions used by the checks), opens FILE and reads its
 * first 10 bytes, installs a SIGUSR1 handler, prints "READY <pid>" and stops
 * itself with raise(SIGSTOP): that is where `mitosis prepare --pid` takes it.
 *
 * After it continues (the parent on SIGCONT, every child when forked) it
 * prints, one per line:
 *   ROLE parent|child <getpid()>
 *   DIGEST <16 hex>          FNV-1a 64 of all the state built before prepare
 *   CHECK <name> ok | CHECK <name> FAIL <detail>    (one per in-process check)
 *   MARKED <16 hex>          (--isolate) digest after writing a pid-dependent
 *                            marker into the state
 *   FINAL <16 hex>           (--hold) digest after a line (or EOF) on stdin
 *   DONE
 * and exits 0. Every phase runs under alarm(), so a hang ends in SIGALRM.
 *
 * FILE content is defined by file_byte() below; the Go test writes the same.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

#define HT_CAP (1u << 18) /* slots, power of two */
#define HT_N 100000u      /* entries */
#define BIG_BYTES (64u << 20)
#define LAZY_BYTES (8u << 20)
#define RSMALL (1u << 20)
#define RBIG (64u << 20)
#define DN_BYTES (256u << 10)
#define GDATA_N 8192u
#define GBSS_N 4096u

struct slot {
	uint64_t key, val;
};

static struct slot *ht;          /* hash table, malloc'd (4 MiB) */
static uint64_t *big;            /* 64 MiB, malloc'd */
static uint64_t gdata[GDATA_N] = {1, 2, 3}; /* .data */
static uint64_t gbss[GBSS_N];    /* .bss */
static uint64_t *lazy;           /* 8 MiB, not part of DIGEST; read by the grandchild and a thread */
static uint64_t *rblock;         /* 1 MiB, realloc'd to 64 MiB after prepare */
static unsigned char *dn;        /* mmap'd private anon, for MADV_DONTNEED */
static int file_fd = -1;
static unsigned char head[10];
static pid_t ready_pid;
static volatile sig_atomic_t usr1_flag;
static uint64_t ht_digest_pre, lazy_digest_pre;

static uint64_t mix(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static uint64_t fnv(uint64_t h, const void *p, size_t n)
{
	const unsigned char *b = p;
	for (size_t i = 0; i < n; i++) {
		h ^= b[i];
		h *= 0x100000001b3ULL;
	}
	return h;
}

#define FNV0 0xcbf29ce484222325ULL

static unsigned char file_byte(size_t i) { return (unsigned char)('a' + (i * 7 + 3) % 26); }

static uint64_t digest_all(void)
{
	uint64_t h = FNV0;
	h = fnv(h, ht, (size_t)HT_CAP * sizeof *ht);
	h = fnv(h, big, BIG_BYTES);
	h = fnv(h, gdata, sizeof gdata);
	h = fnv(h, gbss, sizeof gbss);
	h = fnv(h, head, sizeof head);
	return h;
}

static void ht_insert(uint64_t key, uint64_t val)
{
	uint32_t i = (uint32_t)(key & (HT_CAP - 1));
	while (ht[i].key != 0 && ht[i].key != key)
		i = (i + 1) & (HT_CAP - 1);
	ht[i].key = key;
	ht[i].val = val;
}

static int ht_lookup(uint64_t key, uint64_t *val)
{
	uint32_t i = (uint32_t)(key & (HT_CAP - 1));
	while (ht[i].key != 0) {
		if (ht[i].key == key) {
			*val = ht[i].val;
			return 1;
		}
		i = (i + 1) & (HT_CAP - 1);
	}
	return 0;
}

static void on_usr1(int sig)
{
	(void)sig;
	usr1_flag = 1;
}

static void die(const char *what)
{
	printf("ERROR %s: %s\n", what, strerror(errno));
	fflush(stdout);
	exit(2);
}

static int failed;

static void ok(const char *name) { printf("CHECK %s ok\n", name); }

static void fail(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void fail(const char *name, const char *fmt, ...)
{
	va_list ap;
	failed++;
	printf("CHECK %s FAIL ", name);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
}

/* ---------------- checks (after the prepare point) ---------------- */

static void check_realloc(void)
{
	/* rblock is an mmap'd 1 MiB chunk filled before prepare and never
	 * touched since: glibc grows it with mremap, which moves its pages. */
	uint64_t *p = realloc(rblock, RBIG);
	if (p == NULL) {
		fail("realloc", "realloc(1MiB -> 64MiB) returned NULL: %s", strerror(errno));
		return;
	}
	rblock = p;
	size_t n = RSMALL / 8, bad = 0, first = (size_t)-1, zero = 0;
	for (size_t i = 0; i < n; i++) {
		if (p[i] != mix(i + 424242)) {
			if (first == (size_t)-1)
				first = i;
			bad++;
			if (p[i] == 0)
				zero++;
		}
	}
	if (bad) {
		fail("realloc", "%zu of %zu words differ after realloc (%zu zero), first at byte %zu", bad, n, zero,
		     first * 8);
		return;
	}
	memset((char *)p + RSMALL, 0x5a, RBIG - RSMALL);
	unsigned char *c = (unsigned char *)p;
	for (size_t i = RSMALL; i < RBIG; i += 4093) {
		if (c[i] != 0x5a) {
			fail("realloc", "grown tail byte %zu = %#x, want 0x5a", i, c[i]);
			return;
		}
	}
	if (p[0] != mix(424242) || p[n - 1] != mix(n - 1 + 424242)) {
		fail("realloc", "head changed after writing the tail");
		return;
	}
	ok("realloc");
}

static void check_dontneed(void)
{
	/* dn was filled with 0xA5 before prepare. Touch the first half here,
	 * then drop the whole range: every byte must read back as zero (the
	 * pager must not refill dropped pages with the parent's data). */
	volatile unsigned char sink = 0;
	for (size_t i = 0; i < DN_BYTES / 2; i += 4096)
		sink ^= dn[i];
	(void)sink;
	if (dn[0] != 0xA5 || dn[DN_BYTES / 2 - 1] != 0xA5) {
		fail("dontneed", "region not inherited: dn[0]=%#x, want 0xa5", dn[0]);
		return;
	}
	if (madvise(dn, DN_BYTES, MADV_DONTNEED) != 0) {
		fail("dontneed", "madvise: %s", strerror(errno));
		return;
	}
	for (size_t i = 0; i < DN_BYTES; i++) {
		if (dn[i] != 0) {
			fail("dontneed", "byte %zu = %#x after MADV_DONTNEED, want 0", i, dn[i]);
			return;
		}
	}
	memset(dn, 0x11, DN_BYTES);
	if (dn[DN_BYTES - 1] != 0x11) {
		fail("dontneed", "write after MADV_DONTNEED lost");
		return;
	}
	ok("dontneed");
}

static void check_fork(void)
{
	fflush(stdout);
	pid_t c = fork();
	if (c < 0) {
		fail("fork", "fork: %s", strerror(errno));
		return;
	}
	if (c == 0) {
		int code = 0;
		if (fnv(FNV0, ht, (size_t)HT_CAP * sizeof *ht) != ht_digest_pre)
			code |= 1;
		if (fnv(FNV0, lazy, LAZY_BYTES) != lazy_digest_pre)
			code |= 2;
		uint64_t v;
		if (!ht_lookup(mix(777) | 1, &v) || v != mix((mix(777) | 1) ^ 0xabc))
			code |= 4;
		_exit(code);
	}
	int st;
	pid_t r;
	do
		r = waitpid(c, &st, 0);
	while (r < 0 && errno == EINTR);
	if (r != c) {
		fail("fork", "waitpid: %s", strerror(errno));
		return;
	}
	if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		if (WIFSIGNALED(st))
			fail("fork", "grandchild killed by signal %d", WTERMSIG(st));
		else
			fail("fork", "grandchild exit status %d (1=hash table, 2=lazy region, 4=lookup)",
			     WEXITSTATUS(st));
		return;
	}
	ok("fork");
}

static void check_spawn(void)
{
	pid_t pid;
	char *argv[] = {"true", NULL};
	int e = posix_spawn(&pid, "/bin/true", NULL, NULL, argv, environ);
	if (e != 0) {
		fail("spawn", "posix_spawn /bin/true: %s", strerror(e));
		return;
	}
	int st;
	pid_t r;
	do
		r = waitpid(pid, &st, 0);
	while (r < 0 && errno == EINTR);
	if (r != pid || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
		fail("spawn", "/bin/true: waitpid=%d status=%#x", (int)r, st);
		return;
	}
	ok("spawn");
}

static void check_system(void)
{
	fflush(stdout);
	int st = system("true");
	if (st != 0) {
		fail("system", "system(\"true\") = %#x", st);
		return;
	}
	ok("system");
}

static void check_signal(void)
{
	struct sigaction old;
	if (sigaction(SIGUSR1, NULL, &old) != 0 || old.sa_handler != on_usr1) {
		fail("signal", "SIGUSR1 handler not inherited (handler=%p)", (void *)old.sa_handler);
		return;
	}
	usr1_flag = 0;
	if (raise(SIGUSR1) != 0) {
		fail("signal", "raise: %s", strerror(errno));
		return;
	}
	for (int i = 0; i < 1000 && !usr1_flag; i++)
		usleep(1000);
	if (!usr1_flag) {
		fail("signal", "SIGUSR1 handler did not run after raise(SIGUSR1)");
		return;
	}
	ok("signal");
}

static double ts(struct timespec t) { return (double)t.tv_sec + (double)t.tv_nsec / 1e9; }

static void check_clock(void)
{
	struct timespec a, b, r, sm, sr;
	clock_gettime(CLOCK_MONOTONIC, &a);
	usleep(2000);
	clock_gettime(CLOCK_MONOTONIC, &b);
	if (ts(b) <= ts(a)) {
		fail("clock", "CLOCK_MONOTONIC not increasing: %.9f then %.9f", ts(a), ts(b));
		return;
	}
	if (ts(b) - ts(a) > 5) {
		fail("clock", "CLOCK_MONOTONIC jumped %.3fs over a 2ms sleep", ts(b) - ts(a));
		return;
	}
	clock_gettime(CLOCK_REALTIME, &r);
	time_t t = time(NULL);
	long st = syscall(SYS_time, NULL);
	if (r.tv_sec - t > 5 || t - r.tv_sec > 5) {
		fail("clock", "CLOCK_REALTIME %ld vs time(NULL) %ld", (long)r.tv_sec, (long)t);
		return;
	}
	if (r.tv_sec - st > 5 || st - r.tv_sec > 5) {
		fail("clock", "vdso CLOCK_REALTIME %ld vs time syscall %ld", (long)r.tv_sec, st);
		return;
	}
	/* the kernel's own view (raw syscalls) vs the vdso's */
	syscall(SYS_clock_gettime, CLOCK_MONOTONIC, &sm);
	syscall(SYS_clock_gettime, CLOCK_REALTIME, &sr);
	clock_gettime(CLOCK_MONOTONIC, &a);
	if (ts(a) < ts(sm) - 0.001 || ts(a) - ts(sm) > 5) {
		fail("clock", "vdso CLOCK_MONOTONIC %.6f vs syscall %.6f", ts(a), ts(sm));
		return;
	}
	if (ts(sr) - ts(r) > 5 || ts(r) - ts(sr) > 5) {
		fail("clock", "vdso CLOCK_REALTIME %.6f vs syscall %.6f", ts(r), ts(sr));
		return;
	}
	ok("clock");
}

static void check_sbrk(void)
{
	char *old = sbrk(0);
	char *p = sbrk(1 << 20);
	if (p == (void *)-1) {
		fail("sbrk", "sbrk(1MiB): %s (break was %p)", strerror(errno), (void *)old);
		return;
	}
	memset(p, 0x3c, 1 << 20);
	for (size_t i = 0; i < (1u << 20); i += 511) {
		if ((unsigned char)p[i] != 0x3c) {
			fail("sbrk", "byte %zu of the grown break reads %#x", i, (unsigned char)p[i]);
			return;
		}
	}
	char *now = sbrk(0);
	if (now != p + (1 << 20)) {
		fail("sbrk", "break %p after growth, want %p", (void *)now, (void *)(p + (1 << 20)));
		return;
	}
	ok("sbrk");
}

static void check_file(void)
{
	unsigned char buf[10];
	ssize_t n = read(file_fd, buf, sizeof buf);
	if (n != (ssize_t)sizeof buf) {
		fail("file", "read of the fd opened before prepare returned %zd: %s", n, n < 0 ? strerror(errno) : "short");
		return;
	}
	for (size_t i = 0; i < sizeof buf; i++) {
		if (buf[i] != file_byte(10 + i)) {
			off_t off = lseek(file_fd, 0, SEEK_CUR);
			fail("file", "byte %zu = %#x, want %#x (bytes 10..19 of the file); offset now %lld", i, buf[i],
			     file_byte(10 + i), (long long)off);
			return;
		}
	}
	ok("file");
}

static void check_pid(void)
{
	pid_t me = getpid();
	long tid = syscall(SYS_gettid);
	if (tid != me) {
		fail("pid", "gettid %ld != getpid %d in a single-threaded process", tid, (int)me);
		return;
	}
	if (getppid() <= 0) {
		fail("pid", "getppid %d", (int)getppid());
		return;
	}
	/* a child must not be the parent; the parent is the pid it printed */
	printf("CHECK pid ok %s\n", me == ready_pid ? "parent" : "child");
}

static void *thread_main(void *arg)
{
	(void)arg;
	uint64_t h = fnv(FNV0, lazy, LAZY_BYTES);
	return (void *)(uintptr_t)(h == lazy_digest_pre ? 1 : 2);
}

static void check_thread(void)
{
	pthread_t th;
	void *res = NULL;
	int e = pthread_create(&th, NULL, thread_main, NULL);
	if (e != 0) {
		fail("thread", "pthread_create: %s", strerror(e));
		return;
	}
	e = pthread_join(th, &res);
	if (e != 0) {
		fail("thread", "pthread_join: %s", strerror(e));
		return;
	}
	if ((uintptr_t)res != 1) {
		fail("thread", "a new thread read the lazy region wrong");
		return;
	}
	ok("thread");
}

/* Writes a marker that depends on the pid into everything DIGEST covers. */
static void mark(pid_t pid)
{
	uint64_t m = mix((uint64_t)pid) | 1;
	for (uint32_t k = 0; k < 16; k++) {
		ht[(pid * 31u + k * 4099u) & (HT_CAP - 1)].val ^= m;
		big[((uint64_t)pid * 977u + (uint64_t)k * (BIG_BYTES / 8 / 16)) % (BIG_BYTES / 8)] ^= m;
	}
	gdata[pid % GDATA_N] ^= m;
	gbss[pid % GBSS_N] ^= m;
}

int main(int argc, char **argv)
{
	int isolate = 0, hold = 0;
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2) {
		fprintf(stderr, "usage: %s FILE [--isolate] [--hold]\n", argv[0]);
		return 2;
	}
	for (int i = 2; i < argc; i++) {
		if (strcmp(argv[i], "--isolate") == 0)
			isolate = 1;
		else if (strcmp(argv[i], "--hold") == 0)
			hold = 1;
		else {
			fprintf(stderr, "unknown argument %s\n", argv[i]);
			return 2;
		}
	}

	/* ---- state built before the prepare point ---- */
	ht = malloc((size_t)HT_CAP * sizeof *ht);
	big = malloc(BIG_BYTES);
	lazy = malloc(LAZY_BYTES);
	rblock = malloc(RSMALL);
	if (!ht || !big || !lazy || !rblock)
		die("malloc");
	memset(ht, 0, (size_t)HT_CAP * sizeof *ht);
	for (uint32_t i = 0; i < HT_N; i++) {
		uint64_t key = mix(i) | 1;
		ht_insert(key, mix(key ^ 0xabc));
	}
	for (size_t i = 0; i < BIG_BYTES / 8; i++)
		big[i] = mix(i ^ 0x5555);
	for (size_t i = 0; i < GDATA_N; i++)
		gdata[i] = mix(i + 77);
	for (size_t i = 0; i < GBSS_N; i++)
		gbss[i] = mix(i + 99);
	for (size_t i = 0; i < LAZY_BYTES / 8; i++)
		lazy[i] = mix(i + 1000003);
	for (size_t i = 0; i < RSMALL / 8; i++)
		rblock[i] = mix(i + 424242);
	dn = mmap(NULL, DN_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (dn == MAP_FAILED)
		die("mmap");
	memset(dn, 0xA5, DN_BYTES);
	ht_digest_pre = fnv(FNV0, ht, (size_t)HT_CAP * sizeof *ht);
	lazy_digest_pre = fnv(FNV0, lazy, LAZY_BYTES);

	file_fd = open(argv[1], O_RDONLY);
	if (file_fd < 0)
		die("open");
	if (read(file_fd, head, sizeof head) != (ssize_t)sizeof head)
		die("read");
	for (size_t i = 0; i < sizeof head; i++) {
		if (head[i] != file_byte(i)) {
			printf("ERROR file content: byte %zu = %#x, want %#x\n", i, head[i], file_byte(i));
			return 2;
		}
	}

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL) != 0)
		die("sigaction");

	ready_pid = getpid();
	printf("READY %d\n", (int)ready_pid);
	fflush(stdout);

	/* ---- the prepare point ---- */
	raise(SIGSTOP);

	/* ---- parent after SIGCONT, or a child ---- */
	alarm(40);
	pid_t me = getpid();
	printf("ROLE %s %d\n", me == ready_pid ? "parent" : "child", (int)me);
	printf("DIGEST %016llx\n", (unsigned long long)digest_all());

	check_realloc();
	check_dontneed();
	check_fork();
	check_spawn();
	check_system();
	check_signal();
	check_clock();
	check_sbrk();
	check_file();
	check_pid();
	check_thread();

	if (isolate) {
		mark(me);
		printf("MARKED %016llx\n", (unsigned long long)digest_all());
	}
	if (hold) {
		char line[128];
		alarm(300);
		fflush(stdout);
		if (fgets(line, sizeof line, stdin) == NULL && ferror(stdin))
			printf("ERROR stdin: %s\n", strerror(errno));
		alarm(40);
		printf("FINAL %016llx\n", (unsigned long long)digest_all());
	}
	printf("DONE %d\n", failed);
	fflush(stdout);
	return 0;
}
