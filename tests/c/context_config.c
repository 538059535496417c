/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * Context layouts from the config: what SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT
 * (and WSARecvMsg's IP_WFP_REDIRECT_CONTEXT) answers a service whose
 * `[[service]]` entry says `context = { base64 = ".." }` (opaque vendor
 * bytes) or `context = "sockaddrs"` (two SOCKADDR_STORAGE), with no call
 * to rewire_wsa_set_context_layout.
 *
 *   context_config VENDOR_SVC VENDOR_DST PAIR_SVC PAIR_DST VENDOR_HEX
 *
 * Must run under `rewire run` with services "vendor" (listening on
 * 127.0.0.1:VENDOR_SVC, matching loopback port VENDOR_DST, TCP and UDP, its
 * context the bytes VENDOR_HEX) and "pair" (PAIR_SVC, PAIR_DST, "sockaddrs").
 * The program is each service (in its cgroup) and the application (in the
 * subtree). TAP-like output; exit 0 only if every test passed.
 */
#define _GNU_SOURCE
#include <rewire/wsa.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int test_ok, failures;
static int vendor_svc, vendor_dst, pair_svc, pair_dst;
static unsigned char vendor[REWIRE_WFP_MAX_VENDOR_CONTEXT_SIZE];
static size_t vendor_len;

#define CHECK(cond)                                                                                  \
	do {                                                                                         \
		if (!(cond)) {                                                                       \
			fprintf(stderr, "    %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
			test_ok = 0;                                                                 \
		}                                                                                    \
	} while (0)
#define CHECK_EQ(a, b)                                                                                         \
	do {                                                                                                   \
		long long a_ = (long long)(a), b_ = (long long)(b);                                            \
		if (a_ != b_) {                                                                                \
			fprintf(stderr, "    %s:%d: %s == %lld, expected %lld\n", __FILE__, __LINE__, #a, a_, b_); \
			test_ok = 0;                                                                           \
		}                                                                                              \
	} while (0)
#define RUN(fn)                                                      \
	do {                                                         \
		test_ok = 1;                                         \
		fn();                                                \
		printf("%s - %s\n", test_ok ? "ok" : "not ok", #fn); \
		fflush(stdout);                                      \
		if (!test_ok)                                        \
			failures++;                                  \
	} while (0)

/* Moves this process into service `name`'s cgroup, or (NULL) back to the subtree. */
static void as_service(const char *name)
{
	const char *cg = getenv("REWIRE_CGROUP");
	char path[4096];
	if (!cg) {
		fprintf(stderr, "REWIRE_CGROUP is not set: run under `rewire run`\n");
		exit(2);
	}
	snprintf(path, sizeof path, "%s%s%s/cgroup.procs", cg, name ? "/services/" : "", name ? name : "");
	FILE *f = fopen(path, "w");
	if (!f || fprintf(f, "0\n") < 0 || fclose(f) != 0) {
		fprintf(stderr, "cannot join %s: %s\n", path, strerror(errno));
		exit(2);
	}
}

static socklen_t loopback(int port, struct sockaddr_in *a)
{
	memset(a, 0, sizeof *a);
	a->sin_family = AF_INET;
	a->sin_port = htons(port);
	a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	return sizeof *a;
}

/* A redirected TCP connection to `dst`, accepted by service `svc` listening on `port`. */
static int redirected(const char *svc, int port, int dst, SOCKET *client, SOCKET *accepted)
{
	struct sockaddr_in a;
	int one = 1;
	as_service(svc);
	SOCKET l = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	if (bind(l, (struct sockaddr *)&a, loopback(port, &a)) != 0 || listen(l, 4) != 0) {
		fprintf(stderr, "    listen %s on %d: %s\n", svc, port, strerror(errno));
		exit(2);
	}
	as_service(NULL);
	*client = socket(AF_INET, SOCK_STREAM, 0);
	if (connect(*client, (struct sockaddr *)&a, loopback(dst, &a)) != 0) {
		fprintf(stderr, "    connect to %d: %s\n", dst, strerror(errno));
		test_ok = 0;
		closesocket(l);
		return 0;
	}
	struct pollfd p = {.fd = l, .events = POLLIN};
	*accepted = poll(&p, 1, 5000) == 1 ? accept(l, NULL, NULL) : -1;
	closesocket(l);
	CHECK(*accepted >= 0);
	return *accepted >= 0;
}

/* The vendor service's context query answers exactly its configured bytes. */
static void vendor_bytes_from_the_config(void)
{
	SOCKET c, a;
	if (!redirected("vendor", vendor_svc, vendor_dst, &c, &a))
		return;
	unsigned char buf[REWIRE_WFP_MAX_VENDOR_CONTEXT_SIZE + 16];
	DWORD n = 0xDEADBEEF;
	memset(buf, 0xEE, sizeof buf);
	CHECK_EQ(WSAIoctl(a, SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT, NULL, 0, buf, sizeof buf, &n, NULL, NULL), 0);
	CHECK_EQ(n, vendor_len);
	CHECK(memcmp(buf, vendor, vendor_len) == 0);
	CHECK_EQ(buf[vendor_len], 0xEE); /* nothing written past them */
	/* a buffer one byte short */
	n = 0xDEADBEEF;
	CHECK_EQ(WSAIoctl(a, SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT, NULL, 0, buf, (DWORD)vendor_len - 1, &n, NULL, NULL),
		 SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEINVAL);
	CHECK_EQ(n, 0);
	/* overlapped, the same bytes */
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	memset(buf, 0, sizeof buf);
	CHECK_EQ(WSAIoctl(a, SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT, NULL, 0, buf, sizeof buf, &n, &ov, NULL), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	DWORD got = 0, flags = 0;
	CHECK(WSAGetOverlappedResult(a, &ov, &got, TRUE, &flags));
	CHECK_EQ(got, vendor_len);
	CHECK(memcmp(buf, vendor, vendor_len) == 0);
	/* the process may still ask for rewire's struct */
	CHECK_EQ(rewire_wsa_set_context_layout(REWIRE_WFP_CONTEXT_LAYOUT_REWIRE), REWIRE_WFP_CONTEXT_LAYOUT_SERVICE);
	REWIRE_WFP_CONTEXT ctx;
	CHECK_EQ(WSAIoctl(a, SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT, NULL, 0, &ctx, sizeof ctx, &n, NULL, NULL), 0);
	CHECK_EQ(n, sizeof ctx);
	CHECK_EQ(ctx.magic, 0x5752);
	CHECK_EQ(ctx.service_id, 1);
	CHECK_EQ(ntohs(ctx.records.orig_dst.port_be), vendor_dst);
	CHECK_EQ(rewire_wsa_set_context_layout(REWIRE_WFP_CONTEXT_LAYOUT_SERVICE), REWIRE_WFP_CONTEXT_LAYOUT_REWIRE);
	/* the records query is unchanged */
	unsigned char rec[REWIRE_WFP_MAX_RECORDS_SIZE];
	CHECK_EQ(WSAIoctl(a, SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS, NULL, 0, rec, sizeof rec, &n, NULL, NULL), 0);
	CHECK_EQ(n, sizeof rec);
	/* a connection rewire did not redirect gets no vendor bytes */
	CHECK_EQ(WSAIoctl(c, SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT, NULL, 0, buf, sizeof buf, &n, NULL, NULL), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEINVAL);
	closesocket(a);
	closesocket(c);
}

/* The same bytes in WSARecvMsg's IP_WFP_REDIRECT_CONTEXT control message. */
static void vendor_bytes_in_the_udp_control_message(void)
{
	struct sockaddr_in a;
	GUID id = WSAID_WSARECVMSG;
	LPFN_WSARECVMSG fn = NULL;
	DWORD n, on = TRUE;
	as_service("vendor");
	SOCKET l = socket(AF_INET, SOCK_DGRAM, IPPROTO_UDP);
	CHECK_EQ(WSAIoctl(l, SIO_GET_EXTENSION_FUNCTION_POINTER, &id, sizeof id, &fn, sizeof fn, &n, NULL, NULL), 0);
	CHECK_EQ(rewire_wsa_setsockopt(l, IPPROTO_IP, IP_WFP_REDIRECT_CONTEXT, &on, sizeof on), 0);
	CHECK(bind(l, (struct sockaddr *)&a, loopback(vendor_svc, &a)) == 0);
	as_service(NULL);
	SOCKET app = socket(AF_INET, SOCK_DGRAM, 0);
	CHECK(sendto(app, "v", 1, 0, (struct sockaddr *)&a, loopback(vendor_dst, &a)) == 1);
	as_service("vendor");
	static char control[WSA_CMSG_SPACE(REWIRE_WFP_MAX_VENDOR_CONTEXT_SIZE)];
	char data[8];
	struct sockaddr_storage from;
	WSABUF b = {sizeof data, data};
	WSAMSG msg = {(struct sockaddr *)&from, sizeof from, &b, 1, {sizeof control, control}, 0};
	if (!fn || fn(l, &msg, &n, NULL, NULL) != 0) {
		fprintf(stderr, "    WSARecvMsg: %d\n", WSAGetLastError());
		test_ok = 0;
	} else {
		WSACMSGHDR *c = WSA_CMSG_FIRSTHDR(&msg);
		CHECK(c != NULL);
		if (c) {
			CHECK_EQ(c->cmsg_level, IPPROTO_IP);
			CHECK_EQ(c->cmsg_type, IP_WFP_REDIRECT_CONTEXT);
			CHECK_EQ(c->cmsg_len, WSA_CMSG_LEN(vendor_len));
			CHECK(memcmp(WSA_CMSG_DATA(c), vendor, vendor_len) == 0);
		}
	}
	as_service(NULL);
	closesocket(app);
	closesocket(l);
}

/* The "pair" service gets the two-address layout without asking for it. */
static void two_address_layout_from_the_config(void)
{
	SOCKET c, a;
	if (!redirected("pair", pair_svc, pair_dst, &c, &a))
		return;
	struct sockaddr_storage ctx[2], app;
	socklen_t alen = sizeof app;
	DWORD n = 0;
	memset(ctx, 0xAA, sizeof ctx);
	CHECK_EQ(WSAIoctl(a, SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT, NULL, 0, ctx, sizeof ctx, &n, NULL, NULL), 0);
	CHECK_EQ(n, REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE);
	CHECK(getsockname(c, (struct sockaddr *)&app, &alen) == 0);
	struct sockaddr_in *rem = (struct sockaddr_in *)&ctx[0], *loc = (struct sockaddr_in *)&ctx[1];
	CHECK_EQ(rem->sin_family, AF_INET);
	CHECK_EQ(ntohs(rem->sin_port), pair_dst);
	CHECK_EQ(ntohl(rem->sin_addr.s_addr), INADDR_LOOPBACK);
	CHECK_EQ(loc->sin_family, AF_INET);
	CHECK_EQ(loc->sin_port, ((struct sockaddr_in *)&app)->sin_port);
	/* 152 bytes no longer suffice */
	CHECK_EQ(WSAIoctl(a, SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT, NULL, 0, ctx, REWIRE_WFP_MAX_CONTEXT_SIZE, &n, NULL, NULL),
		 SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEINVAL);
	closesocket(a);
	closesocket(c);
}

int main(int argc, char **argv)
{
	alarm(60);
	if (argc != 6) {
		fprintf(stderr, "usage: %s VENDOR_SVC VENDOR_DST PAIR_SVC PAIR_DST VENDOR_HEX\n", argv[0]);
		return 2;
	}
	vendor_svc = atoi(argv[1]);
	vendor_dst = atoi(argv[2]);
	pair_svc = atoi(argv[3]);
	pair_dst = atoi(argv[4]);
	for (const char *h = argv[5]; h[0] && h[1] && vendor_len < sizeof vendor; h += 2) {
		unsigned v;
		sscanf(h, "%2x", &v);
		vendor[vendor_len++] = (unsigned char)v;
	}
	RUN(vendor_bytes_from_the_config);
	RUN(vendor_bytes_in_the_udp_control_message);
	RUN(two_address_layout_from_the_config);
	printf("# %d failed\n", failures);
	return failures ? 1 : 0;
}
