/*
 * mthreads.c - a multi-threaded C parent of the mitosis end-to-end tests.
 *
 * usage: mthreads [--live] [--churn] [--hop]
 *
 * Starts 8 worker threads. Each builds its own state before the prepare
 * point (a 1 MiB buffer from mix(), a __thread value, its kernel tid) and
 * then loops on its own counter (kept in a local and mirrored in a global):
 *   - threads 0 and 1 hand a token back and forth under a mutex and a
 *     condition variable (untimed futex waits);
 *   - even threads 2..6 sleep in nanosleep between increments;
 *   - odd threads 3..7 wait on a condition variable with a timeout.
 * --churn adds a thread that keeps creating and joining short-lived threads,
 * so threads are born and die while mitosis prepares the process.
 *
 * Prepare point: without --live the main thread prints "READY <pid>" and
 * stops the process with raise(SIGSTOP) (`mitosis prepare --pid` takes it
 * there; the parent continues on SIGCONT). With --live it prints READY and
 * keeps running until it is a child (getpid() changed) or gets SIGUSR1.
 *
 * --hop (stop mode): a child first prints "HOP <pid>" and stops itself
 * again with raise(SIGSTOP), all 8 workers still in their loops: a second
 * prepare point, to prepare the child itself into a seed (multi-hop). Its
 * children, and the child itself on SIGCONT, then go on as below.
 *
 * After the prepare point (the parent, and every child) the main thread
 * releases the workers; each checks that it continues its own state: its
 * counter and the mirror agree, its buffer and __thread value are intact,
 * glibc's cached tid names a live thread of this process (pthread_kill(self,
 * 0)) and, in a child, differs from the parent's; its name (set with
 * pthread_setname_np before the prepare point) is still its own; the handoff pair does 2000
 * more handoffs. Then the main thread joins every thread and prints
 *   ROLE parent|child <pid>
 *   CHECK <name> ok | CHECK <name> FAIL <detail>
 *   DIGEST <16 hex>     FNV-1a 64 of the 8 buffers and __thread values
 *   DONE
 * and exits 0. alarm() bounds every phase: a hang ends in SIGALRM.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define NW 8
#define BUF_WORDS (1u << 17) /* 1 MiB of uint64 per worker */
#define HANDOFFS 2000

static uint64_t *buf[NW];
static volatile uint64_t shadow[NW];
static pid_t parent_tid[NW];
static _Atomic int phase;       /* 0 before the prepare point, 1 after */
static _Atomic int started;
static char fail_msg[NW][128];  /* empty: the worker's checks passed */
static uint64_t tls_seen[NW];
static __thread uint64_t tls_id;

static pthread_mutex_t hmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t hcv = PTHREAD_COND_INITIALIZER;
static int turn;                /* whose turn: 0 or 1 */
static long handoffs;           /* total, under hmu */
static long htarget = -1;       /* stop at this many, under hmu; set after prepare */

static pthread_mutex_t tmu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t tcv = PTHREAD_COND_INITIALIZER; /* never signalled */

static _Atomic long churned;    /* short-lived threads that ran */
static char churn_fail[128];
static pid_t ready_pid;
static volatile sig_atomic_t usr1;

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

static void sleep_us(long us)
{
	struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
	while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
		;
}

static int is_child(void) { return getpid() != ready_pid; }

static void handoff_loop(int me, uint64_t *c)
{
	pthread_mutex_lock(&hmu);
	for (;;) {
		while (turn != me && !(htarget >= 0 && handoffs >= htarget))
			pthread_cond_wait(&hcv, &hmu);
		if (htarget >= 0 && handoffs >= htarget)
			break;
		handoffs++;
		turn = 1 - me;
		(*c)++;
		shadow[me] = *c;
		pthread_cond_broadcast(&hcv);
		if (htarget < 0) {
			pthread_mutex_unlock(&hmu);
			sleep_us(1000);
			pthread_mutex_lock(&hmu);
		}
	}
	if (handoffs % 2 != turn)
		snprintf(fail_msg[me], sizeof fail_msg[me], "handoffs=%ld turn=%d", handoffs, turn);
	pthread_cond_broadcast(&hcv);
	pthread_mutex_unlock(&hmu);
}

static void *worker(void *arg)
{
	int t = (int)(intptr_t)arg;
	uint64_t c = 0; /* the thread's own counter, in its registers or stack */
	char name[16], got[16];
	snprintf(name, sizeof name, "mt-worker-%d", t);
	pthread_setname_np(pthread_self(), name);
	tls_id = mix(1000 + t);
	parent_tid[t] = (pid_t)syscall(SYS_gettid);
	buf[t] = malloc(BUF_WORDS * sizeof(uint64_t));
	for (uint32_t i = 0; i < BUF_WORDS; i++)
		buf[t][i] = mix(((uint64_t)t << 32) | i);
	atomic_fetch_add(&started, 1);
	if (t < 2) {
		handoff_loop(t, &c);
	} else {
		while (!atomic_load(&phase)) {
			c++;
			shadow[t] = c;
			if (t % 2 == 0) {
				sleep_us(2000);
			} else {
				struct timespec dl;
				clock_gettime(CLOCK_REALTIME, &dl);
				dl.tv_nsec += 3000000;
				if (dl.tv_nsec >= 1000000000) {
					dl.tv_sec++;
					dl.tv_nsec -= 1000000000;
				}
				pthread_mutex_lock(&tmu);
				pthread_cond_timedwait(&tcv, &tmu, &dl);
				pthread_mutex_unlock(&tmu);
			}
		}
	}
	/* After the prepare point: is this still this thread's own state? */
	char *m = fail_msg[t];
	if (!m[0] && shadow[t] != c)
		snprintf(m, 128, "counter %llu, mirror %llu", (unsigned long long)c, (unsigned long long)shadow[t]);
	if (!m[0] && c == 0 && t >= 2)
		snprintf(m, 128, "counter never ran");
	if (!m[0] && tls_id != mix(1000 + t))
		snprintf(m, 128, "__thread value %llx", (unsigned long long)tls_id);
	for (uint32_t i = 0; !m[0] && i < BUF_WORDS; i++)
		if (buf[t][i] != mix(((uint64_t)t << 32) | i))
			snprintf(m, 128, "buffer word %u is %llx", i, (unsigned long long)buf[t][i]);
	int e = pthread_kill(pthread_self(), 0);
	if (!m[0] && e != 0)
		snprintf(m, 128, "pthread_kill(self, 0): %s (stale cached tid?)", strerror(e));
	if (!m[0] && (pthread_getname_np(pthread_self(), got, sizeof got) != 0 || strcmp(got, name) != 0))
		snprintf(m, 128, "thread name \"%s\", want \"%s\"", got, name);
	pid_t now = (pid_t)syscall(SYS_gettid);
	if (!m[0] && is_child() && now == parent_tid[t])
		snprintf(m, 128, "runs with the parent's tid %d", now);
	tls_seen[t] = tls_id;
	return NULL;
}

static void *short_lived(void *arg)
{
	(void)arg;
	atomic_fetch_add(&churned, 1);
	return NULL;
}

static void *churner(void *arg)
{
	(void)arg;
	int after = 0;
	for (;;) {
		int post = atomic_load(&phase);
		pthread_t th;
		int e = pthread_create(&th, NULL, short_lived, NULL);
		if (e != 0) {
			snprintf(churn_fail, sizeof churn_fail, "pthread_create: %s", strerror(e));
			return NULL;
		}
		if ((e = pthread_join(th, NULL)) != 0) {
			snprintf(churn_fail, sizeof churn_fail, "pthread_join: %s", strerror(e));
			return NULL;
		}
		if (post && ++after == 50)
			return NULL;
		if (!post)
			sleep_us(200);
	}
}

static void on_usr1(int s) { (void)s; usr1 = 1; }

int main(int argc, char **argv)
{
	int live = 0, churn = 0, hop = 0;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--live"))
			live = 1;
		else if (!strcmp(argv[i], "--churn"))
			churn = 1;
		else if (!strcmp(argv[i], "--hop"))
			hop = 1;
		else {
			fprintf(stderr, "usage: mthreads [--live] [--churn] [--hop]\n");
			return 2;
		}
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGUSR1, on_usr1);
	alarm(120);
	ready_pid = getpid();
	pthread_t th[NW], ch;
	for (int t = 0; t < NW; t++)
		if (pthread_create(&th[t], NULL, worker, (void *)(intptr_t)t) != 0) {
			printf("ERROR pthread_create\n");
			return 2;
		}
	if (churn && pthread_create(&ch, NULL, churner, NULL) != 0) {
		printf("ERROR pthread_create churner\n");
		return 2;
	}
	while (atomic_load(&started) < NW)
		sleep_us(1000);
	sleep_us(20000); /* every worker in its loop */
	printf("READY %d\n", (int)getpid());
	fflush(stdout);
	if (!live)
		raise(SIGSTOP);
	else
		while (!is_child() && !usr1)
			sleep_us(1000);

	if (hop && !live && is_child()) {
		printf("HOP %d\n", (int)getpid());
		fflush(stdout);
		raise(SIGSTOP);
	}
	alarm(60);
	int child = is_child();
	printf("ROLE %s %d\n", child ? "child" : "parent", (int)getpid());
	long churn_before = atomic_load(&churned);
	atomic_store(&phase, 1);
	pthread_mutex_lock(&hmu);
	htarget = handoffs + HANDOFFS;
	pthread_cond_broadcast(&hcv);
	pthread_mutex_unlock(&hmu);
	int joined = 0;
	for (int t = 0; t < NW; t++)
		if (pthread_join(th[t], NULL) == 0)
			joined++;
	if (joined == NW)
		printf("CHECK join ok\n");
	else
		printf("CHECK join FAIL %d of %d joined\n", joined, NW);
	int bad = 0;
	for (int t = 0; t < NW; t++)
		if (fail_msg[t][0]) {
			printf("CHECK thread%d FAIL %s\n", t, fail_msg[t]);
			bad++;
		}
	if (!bad)
		printf("CHECK threads ok\n");
	if (churn) {
		int e = pthread_join(ch, NULL);
		long n = atomic_load(&churned) - churn_before;
		if (e != 0 || churn_fail[0] || n < 50)
			printf("CHECK churn FAIL join=%d %s ran=%ld\n", e, churn_fail, n);
		else
			printf("CHECK churn ok\n");
	}
	uint64_t h = 0xcbf29ce484222325ULL;
	for (int t = 0; t < NW; t++) {
		h = fnv(h, buf[t], BUF_WORDS * sizeof(uint64_t));
		h = fnv(h, &tls_seen[t], sizeof tls_seen[t]);
	}
	printf("DIGEST %016llx\n", (unsigned long long)h);
	printf("DONE\n");
	return 0;
}
