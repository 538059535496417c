/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * A minimal redirect service, written as it would be on Windows with the
 * WFP redirect control codes, running on Linux with rewire.
 *
 * For every connection the kernel hook redirects to it:
 *   1. accept it;
 *   2. WSAIoctl(SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS)  -> opaque blob;
 *   3. WSAIoctl(SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT)  -> who / where;
 *   4. a new socket, WSAIoctl(SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS, blob);
 *   5. connect it to the original destination (from the context);
 *   6. relay both ways with poll(), passing half-closes on.
 * The records make the hook let step 5 through to the destination (or to
 * the next service in the chain) instead of back to this service.
 *
 * Build:  cc -std=c11 -I include examples/c/redirect_proxy.c \
 *            -L target/debug -lrewire_wsa -lpthread -o redirect_proxy
 * Run:    rewire run --config rewire.toml -- sh -c \
 *            './redirect_proxy 127.0.0.1:15001 [::1]:15001 & exec my-app'
 * (the listen addresses are the service's `listen` in the config).
 *
 * Usage: redirect_proxy [--name NAME] [--sockaddr-context | --vendor-context] ADDR:PORT... ; one line per flow on stderr.
 */
#define _GNU_SOURCE
#include <rewire/wsa.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_LISTEN 8
#define IDLE_TIMEOUT_MS 120000

static const char *name = "cexample";
/* --sockaddr-context: read the context in the layout of Microsoft's sample
 * callout (two SOCKADDR_STORAGE: original remote, original local), as a port
 * of a service written for such a callout does. */
static int sockaddr_context;
/* --vendor-context: the service's config gives it opaque vendor bytes
 * (context = { hex = ".." }): read them as they come, and take the original
 * destination from the records instead. */
static int vendor_context;

/* "addr:port" of a sockaddr, for the log. */
static void format_sockaddr(const struct sockaddr_storage *ss, char *out, size_t n)
{
	char ip[INET6_ADDRSTRLEN] = "?";
	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
		inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
		snprintf(out, n, "%s:%u", ip, ntohs(a->sin_port));
	} else if (ss->ss_family == AF_INET6) {
		const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
		inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
		snprintf(out, n, "[%s]:%u", ip, ntohs(a->sin6_port));
	} else {
		snprintf(out, n, "?");
	}
}

static int parse_addr(const char *text, struct sockaddr_storage *ss, socklen_t *len)
{
	char host[INET6_ADDRSTRLEN + 2];
	const char *colon = strrchr(text, ':');
	if (!colon || (size_t)(colon - text) >= sizeof host)
		return -1;
	memcpy(host, text, colon - text);
	host[colon - text] = 0;
	int port = atoi(colon + 1);
	memset(ss, 0, sizeof *ss);
	if (host[0] == '[' && host[strlen(host) - 1] == ']') {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
		host[strlen(host) - 1] = 0;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons(port);
		*len = sizeof *a;
		return inet_pton(AF_INET6, host + 1, &a->sin6_addr) == 1 ? 0 : -1;
	}
	struct sockaddr_in *a = (struct sockaddr_in *)ss;
	a->sin_family = AF_INET;
	a->sin_port = htons(port);
	*len = sizeof *a;
	return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? 0 : -1;
}

/* The original destination, as a sockaddr, from the records' address. */
static socklen_t to_sockaddr(const REWIRE_WFP_ADDR *a, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof *ss);
	if (a->family == AF_INET) {
		struct sockaddr_in *v4 = (struct sockaddr_in *)ss;
		v4->sin_family = AF_INET;
		v4->sin_port = a->port_be;
		memcpy(&v4->sin_addr, a->addr, 4);
		return sizeof *v4;
	}
	struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)ss;
	v6->sin6_family = AF_INET6;
	v6->sin6_port = a->port_be;
	memcpy(&v6->sin6_addr, a->addr, 16);
	return sizeof *v6;
}

static void format_addr(const REWIRE_WFP_ADDR *a, char *out, size_t n)
{
	char ip[INET6_ADDRSTRLEN];
	inet_ntop(a->family, a->addr, ip, sizeof ip);
	snprintf(out, n, a->family == AF_INET6 ? "[%s]:%u" : "%s:%u", ip, ntohs(a->port_be));
}

/* One direction of the relay. */
struct pipe_dir {
	SOCKET from, to;
	char buf[64 * 1024];
	size_t len, off;
	int eof;      /* read side reached EOF */
	int shut;     /* EOF passed on with shutdown(SHUT_WR) */
	unsigned long long bytes;
};

/* Moves what it can without blocking; -1 on a hard error. */
static int pump(struct pipe_dir *d)
{
	for (;;) {
		if (d->len == 0 && !d->eof) {
			ssize_t n = recv(d->from, d->buf, sizeof d->buf, 0);
			if (n > 0) {
				d->len = (size_t)n;
				d->off = 0;
			} else if (n == 0) {
				d->eof = 1;
			} else if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
				return 0;
			} else {
				return -1;
			}
		}
		if (d->len > 0) {
			ssize_t n = send(d->to, d->buf + d->off, d->len - d->off, MSG_NOSIGNAL);
			if (n < 0)
				return (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) ? 0 : -1;
			d->off += (size_t)n;
			d->bytes += (unsigned long long)n;
			if (d->off == d->len)
				d->len = 0;
			else
				return 0;
		}
		if (d->eof && d->len == 0) {
			if (!d->shut) {
				shutdown(d->to, SHUT_WR); /* pass the half-close on */
				d->shut = 1;
			}
			return 0;
		}
	}
}

/* Relays until both directions have ended; returns 0 or -1. */
static int relay(SOCKET a, SOCKET b, unsigned long long *up, unsigned long long *down)
{
	struct pipe_dir *d = calloc(2, sizeof *d);
	if (!d)
		return -1;
	d[0].from = a, d[0].to = b;
	d[1].from = b, d[1].to = a;
	fcntl(a, F_SETFL, fcntl(a, F_GETFL) | O_NONBLOCK);
	fcntl(b, F_SETFL, fcntl(b, F_GETFL) | O_NONBLOCK);
	int rc = 0;
	while (!(d[0].shut && d[1].shut)) {
		if (pump(&d[0]) < 0 || pump(&d[1]) < 0) {
			rc = -1;
			break;
		}
		if (d[0].shut && d[1].shut)
			break;
		struct pollfd p[2] = {{.fd = a}, {.fd = b}};
		if (!d[0].eof && d[0].len == 0)
			p[0].events |= POLLIN;
		if (d[1].len > 0)
			p[0].events |= POLLOUT;
		if (!d[1].eof && d[1].len == 0)
			p[1].events |= POLLIN;
		if (d[0].len > 0)
			p[1].events |= POLLOUT;
		int n = poll(p, 2, IDLE_TIMEOUT_MS);
		if (n == 0 || (n < 0 && errno != EINTR)) {
			rc = -1;
			break;
		}
	}
	*up = d[0].bytes;
	*down = d[1].bytes;
	free(d);
	return rc;
}

static void *serve(void *arg)
{
	SOCKET client = (SOCKET)(intptr_t)arg;
	unsigned char records[REWIRE_WFP_MAX_RECORDS_SIZE];
	REWIRE_WFP_CONTEXT ctx;
	struct sockaddr_storage addrs[2]; /* the two-address layout */
	REWIRE_WFP_RECORDS rec;           /* the blob, read for the log (and the destination with vendor bytes) */
	unsigned char vendor[REWIRE_WFP_MAX_VENDOR_CONTEXT_SIZE];
	DWORD bytes = 0;
	SOCKET upstream = INVALID_SOCKET;
	char dst[64] = "?", local[64] = "";
	struct sockaddr_storage ss;
	socklen_t sslen;

	/* 2. the flow's redirect records: an opaque blob to hand on */
	if (WSAIoctl(client, SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS, NULL, 0, records, sizeof records, &bytes,
		     NULL, NULL) == SOCKET_ERROR) {
		fprintf(stderr, "%s: query records: error %d\n", name, WSAGetLastError());
		goto out;
	}
	DWORD records_len = bytes;

	memcpy(&rec, records, sizeof rec);

	/* 3. the redirect context: original destination and the application */
	void *ctx_buf = vendor_context ? (void *)vendor : sockaddr_context ? (void *)addrs : (void *)&ctx;
	DWORD ctx_len = vendor_context ? (DWORD)sizeof vendor : sockaddr_context ? (DWORD)sizeof addrs : (DWORD)sizeof ctx;
	if (WSAIoctl(client, SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT, NULL, 0, ctx_buf, ctx_len, &bytes, NULL,
		     NULL) == SOCKET_ERROR) {
		fprintf(stderr, "%s: query context: error %d\n", name, WSAGetLastError());
		goto out;
	}
	if (vendor_context) {
		sslen = to_sockaddr(&rec.orig_dst, &ss);
		format_addr(&rec.orig_dst, dst, sizeof dst);
		snprintf(local, sizeof local, " vendor context %u bytes", (unsigned)bytes);
		for (DWORD i = 0; i < bytes && i < 8; i++)
			snprintf(local + strlen(local), sizeof local - strlen(local), "%s%02x", i ? "" : " ", vendor[i]);
	} else if (sockaddr_context) {
		ss = addrs[0];
		sslen = ss.ss_family == AF_INET ? sizeof(struct sockaddr_in) : sizeof(struct sockaddr_in6);
		format_sockaddr(&addrs[0], dst, sizeof dst);
		strcpy(local, " local ");
		format_sockaddr(&addrs[1], local + 7, sizeof local - 7);
	} else {
		sslen = to_sockaddr(&ctx.records.orig_dst, &ss);
		format_addr(&ctx.records.orig_dst, dst, sizeof dst);
	}

	/* 4. the outbound socket carries the records */
	upstream = socket(ss.ss_family, SOCK_STREAM, IPPROTO_TCP);
	if (upstream == INVALID_SOCKET) {
		perror("socket");
		goto out;
	}
	if (WSAIoctl(upstream, SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS, records, records_len, NULL, 0, &bytes, NULL,
		     NULL) == SOCKET_ERROR) {
		fprintf(stderr, "%s: set records: error %d\n", name, WSAGetLastError());
		goto out;
	}

	/* 5. to the original destination (or the next service in the chain) */
	if (connect(upstream, (struct sockaddr *)&ss, sslen) != 0) {
		fprintf(stderr, "%s: connect %s: %s\n", name, dst, strerror(errno));
		goto out;
	}

	/* 6. inspect (here: count) and relay */
	unsigned long long up = 0, down = 0;
	int rc = relay(client, upstream, &up, &down);
	char comm[17];
	memcpy(comm, rec.comm, 16);
	comm[16] = 0;
	fprintf(stderr, "%s: flow %016llx from %s (pid %u)%s to %s, hop %u, chain [", name,
		(unsigned long long)rec.flow_id, comm, rec.pid, local, dst, sockaddr_context || vendor_context ? rec.n_chain : ctx.hop);
	for (unsigned i = 0; i < rec.n_chain && i < 16; i++)
		fprintf(stderr, "%s%u", i ? "," : "", rec.chain[i]);
	fprintf(stderr, "], %llu bytes up, %llu down%s\n", up, down, rc ? ", aborted" : "");
out:
	if (upstream != INVALID_SOCKET)
		closesocket(upstream);
	closesocket(client);
	return NULL;
}

int main(int argc, char **argv)
{
	struct pollfd listeners[MAX_LISTEN];
	int n = 0;
	signal(SIGPIPE, SIG_IGN);
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--name") == 0 && i + 1 < argc) {
			name = argv[++i];
			continue;
		}
		if (strcmp(argv[i], "--vendor-context") == 0) {
			vendor_context = 1;
			continue;
		}
		if (strcmp(argv[i], "--sockaddr-context") == 0) {
			sockaddr_context = 1;
			rewire_wsa_set_context_layout(REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS);
			continue;
		}
		struct sockaddr_storage ss;
		socklen_t len;
		if (n == MAX_LISTEN || parse_addr(argv[i], &ss, &len) != 0) {
			fprintf(stderr, "usage: %s [--name NAME] [--sockaddr-context] ADDR:PORT... (e.g. 127.0.0.1:15001 [::1]:15001)\n",
				argv[0]);
			return 2;
		}
		SOCKET l = socket(ss.ss_family, SOCK_STREAM, 0);
		int one = 1;
		setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
		if (ss.ss_family == AF_INET6)
			setsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
		if (bind(l, (struct sockaddr *)&ss, len) != 0 || listen(l, 128) != 0) {
			fprintf(stderr, "%s: listen on %s: %s\n", name, argv[i], strerror(errno));
			return 1;
		}
		listeners[n].fd = l;
		listeners[n].events = POLLIN;
		n++;
	}
	if (n == 0) {
		fprintf(stderr, "usage: %s [--name NAME] [--sockaddr-context] ADDR:PORT...\n", argv[0]);
		return 2;
	}
	fprintf(stderr, "%s: listening on %d address(es)\n", name, n);
	for (;;) {
		if (poll(listeners, n, -1) < 0) {
			if (errno == EINTR)
				continue;
			perror("poll");
			return 1;
		}
		for (int i = 0; i < n; i++) {
			if (!(listeners[i].revents & POLLIN))
				continue;
			/* 1. accept the redirected connection */
			SOCKET c = accept(listeners[i].fd, NULL, NULL);
			if (c < 0)
				continue;
			pthread_t t;
			pthread_attr_t attr;
			pthread_attr_init(&attr);
			pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
			if (pthread_create(&t, &attr, serve, (void *)(intptr_t)c) != 0)
				closesocket(c);
			pthread_attr_destroy(&attr);
		}
	}
}
