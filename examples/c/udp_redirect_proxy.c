/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * A minimal UDP redirect service, written as it would be on Windows with the
 * WFP control messages, running on Linux with rewire.
 *
 *   1. WSAIoctl(SIO_GET_EXTENSION_FUNCTION_POINTER, WSAID_WSARECVMSG /
 *      WSAID_WSASENDMSG) -> the two functions;
 *   2. on each listening UDP socket, enable IP_WFP_REDIRECT_RECORDS and
 *      IP_WFP_REDIRECT_CONTEXT (IPV6_* on an IPv6 one), then bind;
 *   3. WSARecvMsg: a datagram, its source, and the flow's records and
 *      context as control messages;
 *   4. for a new flow: a new UDP socket; every datagram of the flow is sent
 *      on it with WSASendMsg to the original destination (from the context),
 *      carrying the records as an IP_WFP_REDIRECT_RECORDS control message;
 *   5. a thread per flow receives the replies on that socket and sends each
 *      back to the flow's source with WSASendMsg on the listening socket.
 * The records make rewire send step 4 on to the destination (or the next
 * service in the chain) instead of back to this service.
 *
 * Build:  cc -std=c11 -I include examples/c/udp_redirect_proxy.c \
 *            -L target/debug -lrewire_wsa -lpthread -o udp_redirect_proxy
 * Usage:  udp_redirect_proxy [--name NAME] ADDR:PORT... (the service's
 *         `listen` addresses); one line per flow on stderr.
 */
#define _GNU_SOURCE
#include <rewire/wsa.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define MAX_LISTEN 8
#define FLOW_IDLE_S 60

static const char *name = "cudp";
static LPFN_WSARECVMSG pWSARecvMsg;
static LPFN_WSASENDMSG pWSASendMsg;

/* A flow: the application's address (as the listener sees it) and the onward socket. */
struct flow {
	struct sockaddr_storage client;
	socklen_t client_len;
	SOCKET listener, onward;
	struct flow *next;
};

static pthread_mutex_t flows_lock = PTHREAD_MUTEX_INITIALIZER;
static struct flow *flows;

static void format_sockaddr(const struct sockaddr_storage *ss, char *out, size_t n)
{
	char ip[INET6_ADDRSTRLEN] = "?";
	if (ss->ss_family == AF_INET) {
		const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
		inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
		snprintf(out, n, "%s:%u", ip, ntohs(a->sin_port));
	} else {
		const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
		inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
		snprintf(out, n, "[%s]:%u", ip, ntohs(a->sin6_port));
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

static void *extension(SOCKET s, GUID id)
{
	void *fn = NULL;
	DWORD bytes = 0;
	if (WSAIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &id, sizeof id, &fn, sizeof fn, &bytes, NULL, NULL) != 0) {
		fprintf(stderr, "%s: SIO_GET_EXTENSION_FUNCTION_POINTER: %d\n", name, WSAGetLastError());
		exit(1);
	}
	return fn;
}

/* 5. Replies of one flow: onward socket -> the flow's source, through the listener. */
static void *replies(void *arg)
{
	struct flow *f = arg;
	static _Thread_local char buf[65536];
	struct timeval idle = { FLOW_IDLE_S, 0 };
	setsockopt(f->onward, SOL_SOCKET, SO_RCVTIMEO, &idle, sizeof idle);
	for (;;) {
		ssize_t n = recv(f->onward, buf, sizeof buf, 0);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			break; /* idle (or the flow's socket failed): the flow ends */
		}
		WSABUF data = { (ULONG)n, buf };
		WSAMSG msg = { (struct sockaddr *)&f->client, (INT)f->client_len, &data, 1, { 0, NULL }, 0 };
		DWORD sent = 0;
		if (pWSASendMsg(f->listener, &msg, 0, &sent, NULL, NULL) != 0)
			fprintf(stderr, "%s: reply: WSASendMsg: %d\n", name, WSAGetLastError());
	}
	pthread_mutex_lock(&flows_lock);
	for (struct flow **p = &flows; *p; p = &(*p)->next) {
		if (*p == f) {
			*p = f->next;
			break;
		}
	}
	pthread_mutex_unlock(&flows_lock);
	closesocket(f->onward);
	free(f);
	return NULL;
}

static struct flow *find_flow(SOCKET l, const struct sockaddr_storage *from, socklen_t len)
{
	for (struct flow *f = flows; f; f = f->next)
		if (f->listener == l && f->client_len == len && memcmp(&f->client, from, len) == 0)
			return f;
	return NULL;
}

/* 3 and 4: the receive loop of one listening socket. */
static void *serve(void *arg)
{
	SOCKET l = (SOCKET)(intptr_t)arg;
	static _Thread_local char buf[65536];
	/* Room for both control messages. */
	static _Thread_local char control[WSA_CMSG_SPACE(REWIRE_WFP_MAX_RECORDS_SIZE) + WSA_CMSG_SPACE(REWIRE_WFP_MAX_CONTEXT_SIZE)];
	for (;;) {
		struct sockaddr_storage from;
		WSABUF data = { sizeof buf, buf };
		WSAMSG msg = { (struct sockaddr *)&from, sizeof from, &data, 1, { sizeof control, control }, 0 };
		DWORD n = 0;
		if (pWSARecvMsg(l, &msg, &n, NULL, NULL) != 0) {
			fprintf(stderr, "%s: WSARecvMsg: %d\n", name, WSAGetLastError());
			continue;
		}
		const unsigned char *records = NULL;
		const REWIRE_WFP_CONTEXT *context = NULL;
		for (WSACMSGHDR *c = WSA_CMSG_FIRSTHDR(&msg); c; c = WSA_CMSG_NXTHDR(&msg, c)) {
			if (c->cmsg_level != IPPROTO_IP && c->cmsg_level != IPPROTO_IPV6)
				continue;
			if (c->cmsg_type == IP_WFP_REDIRECT_RECORDS && c->cmsg_len == WSA_CMSG_LEN(REWIRE_WFP_MAX_RECORDS_SIZE))
				records = WSA_CMSG_DATA(c);
			else if (c->cmsg_type == IP_WFP_REDIRECT_CONTEXT && c->cmsg_len == WSA_CMSG_LEN(REWIRE_WFP_MAX_CONTEXT_SIZE))
				context = (const REWIRE_WFP_CONTEXT *)WSA_CMSG_DATA(c);
		}
		if (!records || !context) {
			fprintf(stderr, "%s: a datagram without redirect records (flags %#x): dropped\n", name, (unsigned)msg.dwFlags);
			continue;
		}
		struct sockaddr_storage dst;
		socklen_t dst_len = to_sockaddr(&context->records.orig_dst, &dst);
		pthread_mutex_lock(&flows_lock);
		struct flow *f = find_flow(l, &from, (socklen_t)msg.namelen);
		int fresh = 0;
		if (!f) {
			f = calloc(1, sizeof *f);
			memcpy(&f->client, &from, (size_t)msg.namelen);
			f->client_len = (socklen_t)msg.namelen;
			f->listener = l;
			f->onward = socket(dst.ss_family, SOCK_DGRAM, IPPROTO_UDP);
			f->next = flows;
			flows = f;
			fresh = 1;
		}
		SOCKET onward = f->onward;

		/* 4. onward, with the records (under the lock: the flow's reply
		 * thread may end the flow, closing its socket, meanwhile) */
		char cbuf[WSA_CMSG_SPACE(REWIRE_WFP_MAX_RECORDS_SIZE)];
		memset(cbuf, 0, sizeof cbuf);
		WSACMSGHDR *c = (WSACMSGHDR *)cbuf;
		c->cmsg_len = WSA_CMSG_LEN(REWIRE_WFP_MAX_RECORDS_SIZE);
		c->cmsg_level = dst.ss_family == AF_INET ? IPPROTO_IP : IPPROTO_IPV6;
		c->cmsg_type = dst.ss_family == AF_INET ? IP_WFP_REDIRECT_RECORDS : IPV6_WFP_REDIRECT_RECORDS;
		memcpy(WSA_CMSG_DATA(c), records, REWIRE_WFP_MAX_RECORDS_SIZE);
		WSABUF out = { n, buf };
		WSAMSG smsg = { (struct sockaddr *)&dst, (INT)dst_len, &out, 1, { sizeof cbuf, cbuf }, 0 };
		DWORD sent = 0;
		int rc = pWSASendMsg(onward, &smsg, 0, &sent, NULL, NULL);
		pthread_mutex_unlock(&flows_lock);
		if (rc != 0) {
			fprintf(stderr, "%s: onward: WSASendMsg: %d\n", name, WSAGetLastError());
			continue;
		}
		if (fresh) {
			char a[64], b[64];
			format_sockaddr(&from, a, sizeof a);
			format_sockaddr(&dst, b, sizeof b);
			fprintf(stderr, "%s: udp flow %016llx from %s to %s, chain [%u]\n", name,
				(unsigned long long)context->records.flow_id, a, b, context->records.n_chain);
			pthread_t t;
			pthread_attr_t attr;
			pthread_attr_init(&attr);
			pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
			if (pthread_create(&t, &attr, replies, f) != 0) {
				fprintf(stderr, "%s: no reply thread\n", name);
				exit(1);
			}
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	SOCKET listeners[MAX_LISTEN];
	int n = 0;
	signal(SIGPIPE, SIG_IGN);
	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--name") == 0 && i + 1 < argc) {
			name = argv[++i];
			continue;
		}
		struct sockaddr_storage ss;
		socklen_t len;
		if (n == MAX_LISTEN || parse_addr(argv[i], &ss, &len) != 0) {
			fprintf(stderr, "usage: %s [--name NAME] ADDR:PORT... (e.g. 127.0.0.1:15001 [::1]:15001)\n", argv[0]);
			return 2;
		}
		SOCKET l = socket(ss.ss_family, SOCK_DGRAM, IPPROTO_UDP);
		if (!pWSARecvMsg) {
			/* 1. the extension functions */
			pWSARecvMsg = (LPFN_WSARECVMSG)extension(l, (GUID)WSAID_WSARECVMSG);
			pWSASendMsg = (LPFN_WSASENDMSG)extension(l, (GUID)WSAID_WSASENDMSG);
		}
		/* 2. the control messages, then bind */
		DWORD on = TRUE;
		int level = ss.ss_family == AF_INET ? IPPROTO_IP : IPPROTO_IPV6;
		int one = 1;
		if (ss.ss_family == AF_INET6)
			setsockopt(l, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
		if (rewire_wsa_setsockopt(l, level, ss.ss_family == AF_INET ? IP_WFP_REDIRECT_RECORDS : IPV6_WFP_REDIRECT_RECORDS, &on,
					  sizeof on) != 0 ||
		    rewire_wsa_setsockopt(l, level, ss.ss_family == AF_INET ? IP_WFP_REDIRECT_CONTEXT : IPV6_WFP_REDIRECT_CONTEXT, &on,
					  sizeof on) != 0) {
			fprintf(stderr, "%s: enabling the WFP control messages: %d\n", name, WSAGetLastError());
			return 1;
		}
		if (bind(l, (struct sockaddr *)&ss, len) != 0) {
			fprintf(stderr, "%s: bind %s: %s\n", name, argv[i], strerror(errno));
			return 1;
		}
		listeners[n++] = l;
	}
	if (n == 0) {
		fprintf(stderr, "usage: %s [--name NAME] ADDR:PORT...\n", argv[0]);
		return 2;
	}
	fprintf(stderr, "%s: listening on %d udp address(es)\n", name, n);
	pthread_t t[MAX_LISTEN];
	for (int i = 0; i < n; i++)
		pthread_create(&t[i], NULL, serve, (void *)(intptr_t)listeners[i]);
	for (int i = 0; i < n; i++)
		pthread_join(t[i], NULL);
	return 0;
}
