/*
 * mitosis.h - header-only C client: prepare the calling process into a seed.
 *
 *   #include "mitosis.h"
 *
 *   struct mitosis_role r;
 *   if (mitosis_prepare("worker", &r) < 0) {
 *       fprintf(stderr, "mitosis: %s\n", r.error);
 *       exit(1);
 *   }
 *   if (r.role == MITOSIS_PARENT)
 *       printf("seed %s\n", r.seed);
 *   else
 *       printf("child %s of %s, payload %s\n", r.child, r.seed, r.payload);
 *
 * mitosis_prepare connects to the daemon ($MITOSIS_SOCKET, else
 * /run/mitosis/mitosis.sock), sends {"op":"prepare-self",...} and blocks in a
 * plain read() on the connection (see docs/PROTOCOL.md). The parent returns
 * once the seed exists; every child forked from the seed resumes inside that
 * read, on a fresh connection at the same fd number, and returns with role
 * MITOSIS_CHILD. The fd is closed before returning in both roles. The process
 * must be single-threaded when it calls mitosis_prepare.
 *
 * Returns 0 on success, -1 on failure with errno set and out->error filled.
 */
#ifndef MITOSIS_H
#define MITOSIS_H

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MITOSIS_DEFAULT_SOCKET "/run/mitosis/mitosis.sock"

enum mitosis_role_kind {
	MITOSIS_PARENT = 1,
	MITOSIS_CHILD = 2,
};

struct mitosis_role {
	int role;          /* MITOSIS_PARENT or MITOSIS_CHILD */
	char seed[64];     /* seed id, "s-..." */
	char child[64];    /* child id "c-..." (empty in the parent) */
	char payload[4096];/* raw JSON payload text ("null" if none; truncated if longer) */
	char error[512];   /* message when -1 is returned */
};

/* mitosis__str copies the JSON string value of "key" in line into dst
 * (unescaping \" and \\ and \n; other escapes copied raw). 0 if found. */
static inline int mitosis__str(const char *line, const char *key, char *dst, size_t n)
{
	char pat[64];
	const char *p;
	size_t i = 0;

	snprintf(pat, sizeof pat, "\"%s\":\"", key);
	p = strstr(line, pat);
	if (n == 0)
		return -1;
	dst[0] = '\0';
	if (!p)
		return -1;
	p += strlen(pat);
	while (*p && *p != '"') {
		char c = *p++;
		if (c == '\\' && *p) {
			c = *p++;
			if (c == 'n')
				c = '\n';
			else if (c == 't')
				c = '\t';
		}
		if (i + 1 < n)
			dst[i++] = c;
	}
	dst[i] = '\0';
	return 0;
}

static inline int mitosis__fail(struct mitosis_role *out, int err, const char *fmt, const char *a, const char *b)
{
	snprintf(out->error, sizeof out->error, fmt, a, b);
	errno = err;
	return -1;
}

/* mitosis__json_escape appends s as a JSON string body to dst. */
static inline void mitosis__json_escape(char *dst, size_t n, const char *s)
{
	size_t len = strlen(dst);
	for (; *s && len + 7 < n; s++) {
		unsigned char c = (unsigned char)*s;
		if (c == '"' || c == '\\') {
			dst[len++] = '\\';
			dst[len++] = (char)c;
		} else if (c < 0x20) {
			len += (size_t)snprintf(dst + len, n - len, "\\u%04x", c);
		} else {
			dst[len++] = (char)c;
		}
	}
	dst[len] = '\0';
}

/* mitosis_prepare_at is mitosis_prepare with an explicit socket path (NULL:
 * $MITOSIS_SOCKET, else the default). */
static inline int mitosis_prepare_at(const char *socket_path, const char *name, struct mitosis_role *out)
{
	struct sockaddr_un addr;
	char req[1024];
	char *buf = NULL, *nl = NULL, *p;
	size_t len = 0, cap = 0;
	int fd, saved;
	ssize_t r;

	memset(out, 0, sizeof *out);
	if (!socket_path || !*socket_path)
		socket_path = getenv("MITOSIS_SOCKET");
	if (!socket_path || !*socket_path)
		socket_path = MITOSIS_DEFAULT_SOCKET;
	if (strlen(socket_path) >= sizeof addr.sun_path)
		return mitosis__fail(out, ENAMETOOLONG, "socket path too long: %s%s", socket_path, "");

	fd = socket(AF_UNIX, SOCK_STREAM, 0);
	if (fd < 0)
		return mitosis__fail(out, errno, "socket: %s%s", strerror(errno), "");
	memset(&addr, 0, sizeof addr);
	addr.sun_family = AF_UNIX;
	strcpy(addr.sun_path, socket_path);
	if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
		saved = errno;
		close(fd);
		return mitosis__fail(out, saved, "cannot reach mitosis daemon at %s: %s (start it with `mitosis daemon`)",
				     socket_path, strerror(saved));
	}

	snprintf(req, sizeof req, "{\"op\":\"prepare-self\",\"fd\":%d,\"name\":\"", fd);
	if (name)
		mitosis__json_escape(req, sizeof req - 4, name);
	strcat(req, "\"}\n");
	for (p = req, len = strlen(req); len > 0;) {
		r = write(fd, p, len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			saved = errno;
			close(fd);
			return mitosis__fail(out, saved, "send request to %s: %s", socket_path, strerror(saved));
		}
		p += r;
		len -= (size_t)r;
	}

	/* Plain read(): the daemon snapshots us while we block here, and every
	 * child resumes in this call on its own connection. */
	len = 0;
	while (!nl) {
		if (cap - len < 4096) {
			char *nb;
			cap = cap ? cap * 2 : 8192;
			if (cap > (64u << 20) || !(nb = (char *)realloc(buf, cap + 1))) {
				free(buf);
				close(fd);
				return mitosis__fail(out, ENOMEM, "reply from mitosis daemon too long%s%s", "", "");
			}
			buf = nb;
		}
		r = read(fd, buf + len, cap - len);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			saved = r < 0 ? errno : ECONNRESET;
			free(buf);
			close(fd);
			return mitosis__fail(out, saved, "mitosis daemon at %s closed the connection without a reply%s",
					     socket_path, "");
		}
		len += (size_t)r;
		buf[len] = '\0';
		nl = strchr(buf, '\n');
	}
	close(fd);
	*nl = '\0';

	if (strncmp(buf, "{\"ok\":true", 10) != 0) {
		if (mitosis__str(buf, "error", out->error, sizeof out->error) < 0)
			snprintf(out->error, sizeof out->error, "malformed reply from mitosis daemon");
		free(buf);
		errno = EPROTO;
		return -1;
	}
	if (strstr(buf, "\"role\":\"child\""))
		out->role = MITOSIS_CHILD;
	else if (strstr(buf, "\"role\":\"parent\""))
		out->role = MITOSIS_PARENT;
	else {
		free(buf);
		return mitosis__fail(out, EPROTO, "reply from mitosis daemon has no role%s%s", "", "");
	}
	mitosis__str(buf, "seed", out->seed, sizeof out->seed);
	mitosis__str(buf, "child", out->child, sizeof out->child);
	/* payload is the last field: take the rest of the line minus the '}'. */
	p = strstr(buf, "\"payload\":");
	if (p) {
		size_t pl;
		p += strlen("\"payload\":");
		pl = strlen(p);
		if (pl > 0 && p[pl - 1] == '}')
			pl--;
		if (pl >= sizeof out->payload)
			pl = sizeof out->payload - 1;
		memcpy(out->payload, p, pl);
		out->payload[pl] = '\0';
	} else {
		strcpy(out->payload, "null");
	}
	free(buf);
	return 0;
}

/* mitosis_prepare prepares the calling process into a seed named name (may
 * be NULL) through the daemon at $MITOSIS_SOCKET, else the default socket. */
static inline int mitosis_prepare(const char *name, struct mitosis_role *out)
{
	return mitosis_prepare_at(NULL, name, out);
}

#endif /* MITOSIS_H */
