/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * Conformance suite of rewire's WSAIoctl surface (include/rewire/wsa.h),
 * one test per rule of the specification. Each test asserts the return
 * value, WSAGetLastError() and *lpcbBytesReturned.
 *
 *   conformance                      rules that need no kernel hooks
 *   conformance --kernel SVC DST     all rules; must run under
 *                                    `rewire run` with a service listening
 *                                    on 127.0.0.1:SVC and [::1]:SVC that
 *                                    matches connects to loopback port DST
 *
 * In kernel mode the program is both the redirect service (it listens on
 * SVC) and the application (it connects to DST, which the hook redirects to
 * its own listener), then it queries and sets records on the sockets.
 * Output is TAP-like ("ok - name" / "not ok - name"); exit status 0 only if
 * every test passed. Every wait is bounded.
 */
#define _GNU_SOURCE
#include <rewire/wsa.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static int test_ok;
static int failures;
static int managed; /* kernel mode: every socket is created in a rewire cgroup */

#define CHECK(cond)                                                                      \
	do {                                                                             \
		if (!(cond)) {                                                           \
			fprintf(stderr, "    %s:%d: check failed: %s\n", __FILE__, __LINE__, \
				#cond);                                                  \
			test_ok = 0;                                                     \
		}                                                                        \
	} while (0)

#define CHECK_EQ(a, b)                                                                       \
	do {                                                                                 \
		long long a_ = (long long)(a), b_ = (long long)(b);                          \
		if (a_ != b_) {                                                              \
			fprintf(stderr, "    %s:%d: %s == %lld, expected %s == %lld\n", __FILE__, \
				__LINE__, #a, a_, #b, b_);                                   \
			test_ok = 0;                                                         \
		}                                                                            \
	} while (0)

#define RUN(fn)                                                         \
	do {                                                            \
		test_ok = 1;                                            \
		fn();                                                   \
		printf("%s - %s\n", test_ok ? "ok" : "not ok", #fn);    \
		fflush(stdout);                                         \
		if (!test_ok)                                           \
			failures++;                                     \
	} while (0)

struct res {
	int ret;
	int err;
	DWORD bytes;
};

/* A non-overlapped WSAIoctl; *lpcbBytesReturned starts as garbage. */
static struct res ioc(SOCKET s, DWORD code, void *in, DWORD cbin, void *out, DWORD cbout)
{
	struct res r;
	r.bytes = 0xDEADBEEF;
	WSASetLastError(0);
	r.ret = WSAIoctl(s, code, in, cbin, out, cbout, &r.bytes, NULL, NULL);
	r.err = WSAGetLastError();
	return r;
}

#define EXPECT_FAIL(r, code)                   \
	do {                                   \
		CHECK_EQ((r).ret, SOCKET_ERROR); \
		CHECK_EQ((r).err, (code));     \
		CHECK_EQ((r).bytes, 0);        \
	} while (0)

#define EXPECT_OK(r, n)              \
	do {                         \
		CHECK_EQ((r).ret, 0); \
		CHECK_EQ((r).err, 0); \
		CHECK_EQ((r).bytes, (n)); \
	} while (0)

#define QREC SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS
#define QCTX SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT
#define SETR SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS

/* What a query on a plain, unconnected TCP socket answers. */
static int plain_tcp_code(void)
{
	return managed ? WSAEINVAL /* hooks serve it: not a redirected connection */
		       : WSAEOPNOTSUPP /* no hooks serve it */;
}

static unsigned char sample_blob[REWIRE_WFP_MAX_RECORDS_SIZE];

static void init_sample_blob(void)
{
	REWIRE_WFP_RECORDS r;
	memset(&r, 0, sizeof r);
	r.magic = 0x5752;
	r.version = 1;
	r.n_chain = 1;
	r.proto = IPPROTO_TCP;
	r.chain[0] = 1;
	r.orig_dst.family = AF_INET;
	r.orig_dst.port_be = htons(9);
	r.orig_dst.addr[0] = 127;
	r.orig_dst.addr[3] = 1;
	memcpy(sample_blob, &r, sizeof r);
}

/* A page that is mapped, followed by one that is not. */
static unsigned char *guard_page(void)
{
	long ps = sysconf(_SC_PAGESIZE);
	unsigned char *p = mmap(NULL, 2 * ps, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		abort();
	munmap(p + ps, ps);
	return p;
}

static long page(void)
{
	return sysconf(_SC_PAGESIZE);
}

/* ------------------------------------------------------------------------ */
/* Rules that need no kernel hooks.                                         */

static void unknown_control_code_is_einval(void)
{
	SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
	unsigned char buf[256];
	struct res r = ioc(s, 0x980000DF, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, WSAEINVAL);
	r = ioc(s, 0x12345678, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, WSAEINVAL);
	closesocket(s);
}

static void non_socket_is_enotsock(void)
{
	unsigned char buf[256];
	int fd = open("/dev/null", O_RDONLY);
	struct res r = ioc(fd, QREC, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, WSAENOTSOCK);
	r = ioc(fd, SETR, sample_blob, sizeof sample_blob, NULL, 0);
	EXPECT_FAIL(r, WSAENOTSOCK);
	close(fd);
	r = ioc(fd, QCTX, NULL, 0, buf, sizeof buf); /* closed descriptor */
	EXPECT_FAIL(r, WSAENOTSOCK);
	r = ioc(-1, QCTX, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, WSAENOTSOCK);
}

static void unix_socket_is_eopnotsupp(void)
{
	int sv[2];
	unsigned char buf[256];
	CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == 0);
	struct res r = ioc(sv[0], QREC, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, WSAEOPNOTSUPP);
	r = ioc(sv[0], QCTX, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, WSAEOPNOTSUPP);
	r = ioc(sv[0], SETR, sample_blob, sizeof sample_blob, NULL, 0);
	EXPECT_FAIL(r, WSAEOPNOTSUPP);
	closesocket(sv[0]);
	closesocket(sv[1]);
}

static void plain_tcp_socket_query_fails(void)
{
	unsigned char buf[256];
	SOCKET s = socket(AF_INET6, SOCK_STREAM, 0);
	struct res r = ioc(s, QREC, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, plain_tcp_code());
	r = ioc(s, QCTX, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, plain_tcp_code());
	closesocket(s);
}

static void output_buffer_too_small_is_einval_with_zero_bytes(void)
{
	unsigned char buf[256];
	SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
	DWORD sizes[] = {0, 1, 3, 4, REWIRE_WFP_MAX_RECORDS_SIZE - 1};
	for (unsigned i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
		struct res r = ioc(s, QREC, NULL, 0, buf, sizes[i]);
		EXPECT_FAIL(r, WSAEINVAL);
	}
	struct res r = ioc(s, QCTX, NULL, 0, buf, REWIRE_WFP_MAX_CONTEXT_SIZE - 1);
	EXPECT_FAIL(r, WSAEINVAL);
	r = ioc(s, QCTX, NULL, 0, buf, sizeof(ULONG) - 1);
	EXPECT_FAIL(r, WSAEINVAL);
	closesocket(s);
}

static void set_needs_zero_output_size(void)
{
	unsigned char out[16];
	SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
	struct res r = ioc(s, SETR, sample_blob, sizeof sample_blob, out, sizeof out);
	EXPECT_FAIL(r, WSAEINVAL);
	r = ioc(s, SETR, sample_blob, sizeof sample_blob, NULL, 1);
	EXPECT_FAIL(r, WSAEINVAL);
	/* lpvOutBuffer is ignored when cbOutBuffer is 0, even if it is garbage. */
	r = ioc(s, SETR, sample_blob, sizeof sample_blob, (void *)(uintptr_t)8, 0);
	CHECK(r.err != WSAEFAULT && r.err != 0);
	closesocket(s);
}

static void null_or_unmapped_output_is_efault(void)
{
	SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
	unsigned char *p = guard_page();
	long ps = page();
	struct res r = ioc(s, QREC, NULL, 0, NULL, 256);
	EXPECT_FAIL(r, WSAEFAULT);
	r = ioc(s, QCTX, NULL, 0, NULL, 0);
	EXPECT_FAIL(r, WSAEFAULT);
	r = ioc(s, QREC, NULL, 0, p + ps, 256); /* wholly unmapped */
	EXPECT_FAIL(r, WSAEFAULT);
	r = ioc(s, QCTX, NULL, 0, p + ps - 100, 200); /* straddles the end */
	EXPECT_FAIL(r, WSAEFAULT);
	r = ioc(s, QREC, NULL, 0, (void *)(uintptr_t)16, 256); /* near NULL */
	EXPECT_FAIL(r, WSAEFAULT);
	unsigned char *ro = mmap(NULL, ps, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	r = ioc(s, QREC, NULL, 0, ro, 256); /* not writable */
	EXPECT_FAIL(r, WSAEFAULT);
	munmap(ro, ps);
	munmap(p, ps);
	closesocket(s);
}

static void null_or_unmapped_input_is_efault(void)
{
	SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
	unsigned char *p = guard_page();
	long ps = page();
	struct res r = ioc(s, SETR, NULL, REWIRE_WFP_MAX_RECORDS_SIZE, NULL, 0);
	EXPECT_FAIL(r, WSAEFAULT);
	r = ioc(s, SETR, NULL, 0, NULL, 0);
	EXPECT_FAIL(r, WSAEFAULT);
	r = ioc(s, SETR, p + ps, REWIRE_WFP_MAX_RECORDS_SIZE, NULL, 0);
	EXPECT_FAIL(r, WSAEFAULT);
	memcpy(p + ps - 64, sample_blob, 64);
	r = ioc(s, SETR, p + ps - 64, REWIRE_WFP_MAX_RECORDS_SIZE, NULL, 0);
	EXPECT_FAIL(r, WSAEFAULT);
	r = ioc(s, SETR, sample_blob, 0xFFFFFFFFu, NULL, 0); /* length runs off the mapping */
	EXPECT_FAIL(r, WSAEFAULT);
	munmap(p, ps);
	closesocket(s);
}

static void bad_bytes_returned_pointer_is_efault(void)
{
	SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
	unsigned char buf[256];
	unsigned char *p = guard_page();
	long ps = page();
	WSASetLastError(0);
	int ret = WSAIoctl(s, QREC, NULL, 0, buf, sizeof buf, NULL, NULL, NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEFAULT);
	WSASetLastError(0);
	ret = WSAIoctl(s, QREC, NULL, 0, buf, sizeof buf, (LPDWORD)(p + ps), NULL, NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEFAULT);
	WSASetLastError(0);
	ret = WSAIoctl(s, QREC, NULL, 0, buf, sizeof buf, (LPDWORD)(p + ps - 2), NULL, NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEFAULT);
	munmap(p, ps);
	closesocket(s);
}

static void overlapped_argument_checks_are_synchronous(void)
{
	SOCKET s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	unsigned char buf[256];
	unsigned char *p = guard_page();
	long ps = page();
	CHECK(s != INVALID_SOCKET);
	/* unmapped WSAOVERLAPPED */
	DWORD n = 0xDEADBEEF;
	WSASetLastError(0);
	int ret = WSAIoctl(s, QREC, NULL, 0, buf, sizeof buf, &n, (LPWSAOVERLAPPED)(p + ps - 8), NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEFAULT);
	CHECK_EQ(n, 0);
	/* completion routine outside the address space */
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	n = 0xDEADBEEF;
	ret = WSAIoctl(s, QREC, NULL, 0, buf, sizeof buf, &n, &ov,
		       (LPWSAOVERLAPPED_COMPLETION_ROUTINE)(uintptr_t)8);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEFAULT);
	CHECK_EQ(n, 0);
	/* hEvent that is not an event */
	ov.hEvent = (WSAEVENT)(uintptr_t)0x7777777;
	n = 0xDEADBEEF;
	ret = WSAIoctl(s, QREC, NULL, 0, buf, sizeof buf, &n, &ov, NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSA_INVALID_HANDLE);
	CHECK_EQ(n, 0);
	/* too-small buffer is still reported at once, not through the completion */
	ov.hEvent = NULL;
	n = 0xDEADBEEF;
	ret = WSAIoctl(s, QREC, NULL, 0, buf, 8, &n, &ov, NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEINVAL);
	CHECK_EQ(n, 0);
	munmap(p, ps);
	closesocket(s);
}

static void non_overlapped_socket_ignores_lpoverlapped(void)
{
	SOCKET s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, 0);
	unsigned char buf[256];
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	ov.hEvent = WSACreateEvent();
	DWORD n = 0xDEADBEEF;
	WSASetLastError(0);
	int ret = WSAIoctl(s, QREC, NULL, 0, buf, sizeof buf, &n, &ov, NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), plain_tcp_code()); /* synchronous answer, not WSA_IO_PENDING */
	CHECK_EQ(n, 0);
	CHECK_EQ(ov.Internal, 0);
	CHECK_EQ(WSAWaitForMultipleEvents(1, &ov.hEvent, TRUE, 0, FALSE), WSA_WAIT_TIMEOUT);
	CHECK(WSACloseEvent(ov.hEvent));
	closesocket(s);
}

static void overlapped_error_completes_through_event(void)
{
	SOCKET s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	unsigned char buf[256];
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	ov.hEvent = WSACreateEvent();
	DWORD n = 0xDEADBEEF, t = 77, fl = 77;
	WSASetLastError(0);
	int ret = WSAIoctl(s, QREC, NULL, 0, buf, sizeof buf, &n, &ov, NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	CHECK_EQ(n, 0);
	CHECK_EQ(WSAWaitForMultipleEvents(1, &ov.hEvent, TRUE, 5000, FALSE), WSA_WAIT_EVENT_0);
	CHECK(HasOverlappedIoCompleted(&ov));
	WSASetLastError(0);
	CHECK_EQ(WSAGetOverlappedResult(s, &ov, &t, FALSE, &fl), FALSE);
	CHECK_EQ(WSAGetLastError(), plain_tcp_code());
	CHECK_EQ(t, 0);
	CHECK_EQ(fl, 0);
	WSACloseEvent(ov.hEvent);
	closesocket(s);
}

static void overlapped_pending_is_incomplete_until_done(void)
{
	SOCKET s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	unsigned char buf[256];
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	DWORD n = 0xDEADBEEF, t = 77, fl = 77;
	rewire_wsa_set_completion_delay(300);
	int ret = WSAIoctl(s, QCTX, NULL, 0, buf, sizeof buf, &n, &ov, NULL);
	rewire_wsa_set_completion_delay(0);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	CHECK_EQ(n, 0);
	CHECK_EQ(ov.Internal, STATUS_PENDING);
	WSASetLastError(0);
	CHECK_EQ(WSAGetOverlappedResult(s, &ov, &t, FALSE, &fl), FALSE);
	CHECK_EQ(WSAGetLastError(), WSA_IO_INCOMPLETE);
	WSASetLastError(0);
	CHECK_EQ(WSAGetOverlappedResult(s, &ov, &t, TRUE, &fl), FALSE); /* waits (no event) */
	CHECK_EQ(WSAGetLastError(), plain_tcp_code());
	CHECK_EQ(t, 0);
	closesocket(s);
}

static DWORD cr_err, cr_bytes, cr_calls;
static LPWSAOVERLAPPED cr_ov;
static pthread_t cr_thread;

static void CALLBACK completion(DWORD err, DWORD bytes, LPWSAOVERLAPPED ov, DWORD flags)
{
	(void)flags;
	cr_err = err;
	cr_bytes = bytes;
	cr_ov = ov;
	cr_thread = pthread_self();
	cr_calls++;
}

static void closesocket_aborts_pending_event(void)
{
	SOCKET s = WSASocket(AF_INET6, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	unsigned char buf[256];
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	ov.hEvent = WSACreateEvent();
	CHECK(WSASetEvent(ov.hEvent)); /* the call resets it */
	DWORD n = 0xDEADBEEF, t = 77, fl = 77;
	rewire_wsa_set_completion_delay(5000);
	int ret = WSAIoctl(s, QREC, NULL, 0, buf, sizeof buf, &n, &ov, NULL);
	rewire_wsa_set_completion_delay(0);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	CHECK_EQ(n, 0);
	CHECK_EQ(WSAWaitForMultipleEvents(1, &ov.hEvent, TRUE, 0, FALSE), WSA_WAIT_TIMEOUT);
	CHECK_EQ(closesocket(s), 0);
	CHECK_EQ(WSAWaitForMultipleEvents(1, &ov.hEvent, TRUE, 1000, FALSE), WSA_WAIT_EVENT_0);
	WSASetLastError(0);
	CHECK_EQ(WSAGetOverlappedResult(s, &ov, &t, TRUE, &fl), FALSE);
	CHECK_EQ(WSAGetLastError(), WSA_OPERATION_ABORTED);
	CHECK_EQ(t, 0);
	CHECK_EQ(ov.Internal, WSA_OPERATION_ABORTED);
	WSACloseEvent(ov.hEvent);
}

static void closesocket_aborts_pending_completion_routine(void)
{
	SOCKET s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, 0);
	CHECK_EQ(rewire_wsa_set_overlapped(s, TRUE), 0);
	unsigned char blob[REWIRE_WFP_MAX_RECORDS_SIZE];
	memcpy(blob, sample_blob, sizeof blob);
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	WSAEVENT idle = WSACreateEvent();
	cr_calls = 0;
	cr_err = 0;
	DWORD n = 0xDEADBEEF;
	rewire_wsa_set_completion_delay(5000);
	int ret = WSAIoctl(s, SETR, blob, sizeof blob, NULL, 0, &n, &ov, completion);
	rewire_wsa_set_completion_delay(0);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	CHECK_EQ(n, 0);
	CHECK_EQ(closesocket(s), 0);
	CHECK_EQ(cr_calls, 0); /* only an alertable wait runs it */
	CHECK_EQ(WSAWaitForMultipleEvents(1, &idle, FALSE, 0, FALSE), WSA_WAIT_TIMEOUT);
	CHECK_EQ(cr_calls, 0);
	CHECK_EQ(WSAWaitForMultipleEvents(1, &idle, FALSE, 2000, TRUE), WSA_WAIT_IO_COMPLETION);
	CHECK_EQ(cr_calls, 1);
	CHECK_EQ(cr_err, WSA_OPERATION_ABORTED);
	CHECK_EQ(cr_bytes, 0);
	CHECK(cr_ov == &ov);
	CHECK(pthread_equal(cr_thread, pthread_self()));
	WSACloseEvent(idle);
}

static void *other_thread(void *arg)
{
	(void)arg;
	WSASetLastError(1111);
	unsigned char buf[8];
	int fd = open("/dev/null", O_RDONLY);
	struct res r = ioc(fd, QREC, NULL, 0, buf, sizeof buf);
	close(fd);
	return (void *)(intptr_t)(r.err == WSAENOTSOCK && WSAGetLastError() == WSAENOTSOCK);
}

static void last_error_is_per_thread(void)
{
	WSASetLastError(4242);
	pthread_t t;
	void *ok = NULL;
	CHECK(pthread_create(&t, NULL, other_thread, NULL) == 0);
	pthread_join(t, &ok);
	CHECK(ok != NULL);
	CHECK_EQ(WSAGetLastError(), 4242);
}

static void events_and_waits(void)
{
	WSAEVENT e[2] = {WSACreateEvent(), WSACreateEvent()};
	CHECK(e[0] != WSA_INVALID_EVENT && e[1] != WSA_INVALID_EVENT && e[0] != e[1]);
	CHECK_EQ(WSAWaitForMultipleEvents(2, e, FALSE, 10, FALSE), WSA_WAIT_TIMEOUT);
	CHECK(WSASetEvent(e[1]));
	CHECK_EQ(WSAWaitForMultipleEvents(2, e, FALSE, 0, FALSE), WSA_WAIT_EVENT_0 + 1);
	CHECK_EQ(WSAWaitForMultipleEvents(2, e, TRUE, 0, FALSE), WSA_WAIT_TIMEOUT);
	CHECK(WSASetEvent(e[0]));
	CHECK_EQ(WSAWaitForMultipleEvents(2, e, TRUE, 0, FALSE), WSA_WAIT_EVENT_0);
	CHECK(WSAResetEvent(e[0]));
	CHECK_EQ(WSAWaitForMultipleEvents(1, e, TRUE, 0, FALSE), WSA_WAIT_TIMEOUT);
	CHECK_EQ(WSAWaitForMultipleEvents(0, e, TRUE, 0, FALSE), WSA_WAIT_FAILED);
	CHECK_EQ(WSAGetLastError(), WSA_INVALID_PARAMETER);
	CHECK_EQ(WSAWaitForMultipleEvents(2, NULL, TRUE, 0, FALSE), WSA_WAIT_FAILED);
	CHECK_EQ(WSAGetLastError(), WSAEFAULT);
	CHECK(WSACloseEvent(e[0]));
	CHECK_EQ(WSACloseEvent(e[0]), FALSE);
	CHECK_EQ(WSAGetLastError(), WSA_INVALID_HANDLE);
	CHECK_EQ(WSAWaitForMultipleEvents(2, e, FALSE, 0, FALSE), WSA_WAIT_FAILED);
	CHECK_EQ(WSAGetLastError(), WSA_INVALID_HANDLE);
	CHECK(WSACloseEvent(e[1]));
	CHECK_EQ(SleepEx(1, TRUE), 0);
}

static void closesocket_and_overlapped_mark_need_a_socket(void)
{
	int fd = open("/dev/null", O_RDONLY);
	WSASetLastError(0);
	CHECK_EQ(closesocket(fd), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAENOTSOCK);
	WSASetLastError(0);
	CHECK_EQ(rewire_wsa_set_overlapped(fd, TRUE), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAENOTSOCK);
	close(fd);
	WSASetLastError(0);
	CHECK_EQ(WSASocket(AF_INET, SOCK_STREAM, 0, (void *)1, 0, 0), INVALID_SOCKET);
	CHECK_EQ(WSAGetLastError(), WSAEINVAL);
}

static void wspioctl_reports_through_lperrno(void)
{
	int fd = open("/dev/null", O_RDONLY);
	unsigned char buf[256];
	DWORD n = 0xDEADBEEF;
	int e = 0;
	WSATHREADID tid = {NULL, 0};
	int ret = WSPIoctl(fd, QREC, NULL, 0, buf, sizeof buf, &n, NULL, NULL, &tid, &e);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(e, WSAENOTSOCK);
	CHECK_EQ(WSAGetLastError(), WSAENOTSOCK);
	CHECK_EQ(n, 0);
	SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
	e = 0;
	n = 0xDEADBEEF;
	ret = WSPIoctl(s, QREC, NULL, 0, buf, 2, &n, NULL, NULL, &tid, &e);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(e, WSAEINVAL);
	CHECK_EQ(n, 0);
	WSASetLastError(0);
	ret = WSPIoctl(s, QREC, NULL, 0, buf, sizeof buf, &n, NULL, NULL, &tid, NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEFAULT);
	close(fd);
	closesocket(s);
}

/* ---- Descriptor identity, fork, threads (item: state bound to the socket) */

/* An overlapped call on s with an event; returns the WSAIoctl result. */
static int start_query(SOCKET s, WSAOVERLAPPED *ov, unsigned char *buf, DWORD delay_ms)
{
	DWORD n = 0xDEADBEEF;
	memset(ov, 0, sizeof *ov);
	ov->hEvent = WSACreateEvent();
	rewire_wsa_set_completion_delay(delay_ms);
	WSASetLastError(0);
	int ret = WSAIoctl(s, QREC, NULL, 0, buf, 256, &n, ov, NULL);
	rewire_wsa_set_completion_delay(0);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	CHECK_EQ(n, 0);
	return ret;
}

/* The error an overlapped operation finished with (0 on success), waiting for it. */
static int finish(SOCKET s, WSAOVERLAPPED *ov)
{
	DWORD t = 77, fl = 77;
	WSASetLastError(0);
	BOOL ok = WSAGetOverlappedResult(s, ov, &t, TRUE, &fl);
	int err = ok ? 0 : WSAGetLastError();
	if (ov->hEvent)
		WSACloseEvent(ov->hEvent);
	return err;
}

static void closed_number_reused_starts_fresh(void)
{
	unsigned char buf[256];
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	/* an overlapped socket closed with close(); a non-overlapped one gets its number */
	SOCKET s1 = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	CHECK(s1 >= 0);
	close(s1);
	SOCKET s2 = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, 0);
	CHECK_EQ(s2, s1);
	DWORD n = 0xDEADBEEF;
	WSASetLastError(0);
	int ret = WSAIoctl(s2, QREC, NULL, 0, buf, sizeof buf, &n, &ov, NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), plain_tcp_code()); /* synchronous: nothing carried over */
	CHECK_EQ(ov.Internal, 0);
	close(s2);
	/* a socket made non-overlapped, closed; socket() on its number is overlapped by default */
	SOCKET s3 = socket(AF_INET, SOCK_STREAM, 0);
	CHECK_EQ(rewire_wsa_set_overlapped(s3, FALSE), 0);
	close(s3);
	SOCKET s4 = socket(AF_INET6, SOCK_STREAM, 0);
	CHECK_EQ(s4, s3);
	start_query(s4, &ov, buf, 0);
	CHECK_EQ(finish(s4, &ov), plain_tcp_code());
	closesocket(s4);
	/* with the default switched off, an overlapped socket's number does not pass its mark on */
	CHECK_EQ(rewire_wsa_set_default_overlapped(FALSE), TRUE);
	SOCKET s5 = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	close(s5);
	SOCKET s6 = socket(AF_INET, SOCK_STREAM, 0);
	CHECK_EQ(s6, s5);
	memset(&ov, 0, sizeof ov);
	n = 0xDEADBEEF;
	WSASetLastError(0);
	ret = WSAIoctl(s6, QREC, NULL, 0, buf, sizeof buf, &n, &ov, NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), plain_tcp_code());
	CHECK_EQ(ov.Internal, 0);
	CHECK_EQ(rewire_wsa_set_default_overlapped(TRUE), FALSE);
	closesocket(s6);
}

static void pending_operation_of_closed_socket_is_aborted(void)
{
	unsigned char buf[256];
	WSAOVERLAPPED ov;
	/* closed, and the number reopened as a file: the operation must not run on the file */
	SOCKET s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	start_query(s, &ov, buf, 300);
	close(s);
	int fd = open("/dev/null", O_RDONLY);
	CHECK_EQ(fd, s);
	CHECK_EQ(finish(s, &ov), WSA_OPERATION_ABORTED);
	CHECK_EQ(ov.InternalHigh, 0);
	close(fd);
	/* closed, and the number reopened as another socket: not run on that one either */
	s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	start_query(s, &ov, buf, 300);
	close(s);
	SOCKET other = socket(AF_INET6, SOCK_DGRAM, 0);
	CHECK_EQ(other, s);
	CHECK_EQ(finish(s, &ov), WSA_OPERATION_ABORTED);
	/* closed and not reused */
	s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	start_query(s, &ov, buf, 300);
	close(s);
	CHECK_EQ(finish(s, &ov), WSA_OPERATION_ABORTED);
	closesocket(other);
}

static void fork_child_runs_its_own_operations(void)
{
	unsigned char buf[256], cbuf[256];
	WSAOVERLAPPED ov;
	SOCKET s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	start_query(s, &ov, buf, 1000); /* still pending at the fork */
	fflush(NULL);
	pid_t pid = fork();
	if (pid == 0) {
		alarm(20);
		test_ok = 1;
		/* the parent's pending operation is not the child's: reported aborted here */
		CHECK_EQ(ov.Internal, WSA_OPERATION_ABORTED);
		CHECK_EQ(WSAWaitForMultipleEvents(1, &ov.hEvent, TRUE, 0, FALSE), WSA_WAIT_EVENT_0);
		/* the child's own operations complete */
		WSAOVERLAPPED cov;
		SOCKET c = WSASocket(AF_INET6, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
		start_query(c, &cov, cbuf, 0);
		CHECK_EQ(WSAWaitForMultipleEvents(1, &cov.hEvent, TRUE, 10000, FALSE), WSA_WAIT_EVENT_0);
		CHECK_EQ(finish(c, &cov), plain_tcp_code());
		/* and again, after a second fork in the child */
		pid_t g = fork();
		if (g == 0) {
			test_ok = 1;
			start_query(c, &cov, cbuf, 0);
			CHECK_EQ(WSAWaitForMultipleEvents(1, &cov.hEvent, TRUE, 10000, FALSE), WSA_WAIT_EVENT_0);
			CHECK_EQ(finish(c, &cov), plain_tcp_code());
			_exit(test_ok ? 0 : 1);
		}
		int gs = -1;
		CHECK(g > 0 && waitpid(g, &gs, 0) == g && WIFEXITED(gs) && WEXITSTATUS(gs) == 0);
		_exit(test_ok ? 0 : 1);
	}
	int status = -1;
	CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	/* the parent's operation survives the fork and completes with its real result */
	CHECK_EQ(finish(s, &ov), plain_tcp_code());
	closesocket(s);
}

struct thread_op {
	SOCKET s;
	WSAOVERLAPPED ov;
	unsigned char buf[256];
	int ret, err;
	int use_routine;
};

static void *issue_and_exit(void *arg)
{
	struct thread_op *t = arg;
	DWORD n = 0xDEADBEEF;
	rewire_wsa_set_completion_delay(3000);
	t->ret = WSAIoctl(t->s, QREC, NULL, 0, t->buf, sizeof t->buf, &n, &t->ov, t->use_routine ? completion : NULL);
	rewire_wsa_set_completion_delay(0);
	t->err = WSAGetLastError();
	return NULL; /* exits with the operation pending */
}

static void exited_thread_operations_are_aborted(void)
{
	static struct thread_op t1, t2;
	pthread_t th;
	cr_calls = 0;
	/* a completion routine's operation */
	memset(&t1, 0, sizeof t1);
	t1.s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	t1.use_routine = 1;
	CHECK(pthread_create(&th, NULL, issue_and_exit, &t1) == 0);
	pthread_join(th, NULL);
	CHECK_EQ(t1.ret, SOCKET_ERROR);
	CHECK_EQ(t1.err, WSA_IO_PENDING);
	CHECK_EQ(finish(t1.s, &t1.ov), WSA_OPERATION_ABORTED);
	/* an event's operation: the event is signalled with the abort */
	memset(&t2, 0, sizeof t2);
	t2.s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	t2.ov.hEvent = WSACreateEvent();
	CHECK(pthread_create(&th, NULL, issue_and_exit, &t2) == 0);
	pthread_join(th, NULL);
	CHECK_EQ(t2.err, WSA_IO_PENDING);
	CHECK_EQ(WSAWaitForMultipleEvents(1, &t2.ov.hEvent, TRUE, 0, FALSE), WSA_WAIT_EVENT_0);
	CHECK_EQ(finish(t2.s, &t2.ov), WSA_OPERATION_ABORTED);
	/* the exited thread's routine never runs, on this thread or any other */
	CHECK_EQ(SleepEx(0, TRUE), 0);
	CHECK_EQ(cr_calls, 0);
	closesocket(t1.s);
	closesocket(t2.s);
}

/* ---- SIO_FLUSH and CancelIo/CancelIoEx ---------------------------------- */

static void sio_flush_aborts_pending_and_socket_stays_usable(void)
{
	unsigned char b1[256], b2[256], b3[256];
	WSAOVERLAPPED o1, o2, o3;
	SOCKET s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	SOCKET bystander = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	start_query(s, &o1, b1, 5000);
	start_query(bystander, &o3, b3, 300);
	/* a second one with a completion routine */
	memset(&o2, 0, sizeof o2);
	DWORD n = 0xDEADBEEF;
	cr_calls = 0;
	rewire_wsa_set_completion_delay(5000);
	CHECK_EQ(WSAIoctl(s, QCTX, NULL, 0, b2, sizeof b2, &n, &o2, completion), SOCKET_ERROR);
	rewire_wsa_set_completion_delay(0);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	struct res r = ioc(s, SIO_FLUSH, NULL, 0, NULL, 0);
	CHECK_EQ(r.ret, 0);
	CHECK_EQ(r.bytes, 0);
	/* both aborted before SIO_FLUSH returned */
	CHECK_EQ(o1.Internal, WSA_OPERATION_ABORTED);
	CHECK_EQ(WSAWaitForMultipleEvents(1, &o1.hEvent, TRUE, 0, FALSE), WSA_WAIT_EVENT_0);
	CHECK_EQ(finish(s, &o1), WSA_OPERATION_ABORTED);
	CHECK_EQ(SleepEx(0, TRUE), WAIT_IO_COMPLETION);
	CHECK_EQ(cr_calls, 1);
	CHECK_EQ(cr_err, WSA_OPERATION_ABORTED);
	CHECK(cr_ov == &o2);
	/* another socket's operation is untouched */
	CHECK_EQ(finish(bystander, &o3), plain_tcp_code());
	/* the socket stays usable, overlapped and not */
	start_query(s, &o1, b1, 0);
	CHECK_EQ(finish(s, &o1), plain_tcp_code());
	r = ioc(s, QREC, NULL, 0, b1, sizeof b1);
	EXPECT_FAIL(r, plain_tcp_code());
	/* overlapped SIO_FLUSH: done at once, and its completion is reported too */
	WSAOVERLAPPED fo;
	memset(&fo, 0, sizeof fo);
	fo.hEvent = WSACreateEvent();
	n = 0xDEADBEEF;
	CHECK_EQ(WSAIoctl(s, SIO_FLUSH, NULL, 0, NULL, 0, &n, &fo, NULL), 0);
	CHECK_EQ(n, 0);
	CHECK_EQ(fo.Internal, 0);
	CHECK_EQ(WSAWaitForMultipleEvents(1, &fo.hEvent, TRUE, 0, FALSE), WSA_WAIT_EVENT_0);
	WSACloseEvent(fo.hEvent);
	/* SIO_FLUSH with nothing pending, and on a non-socket */
	r = ioc(s, SIO_FLUSH, NULL, 0, NULL, 0);
	CHECK_EQ(r.ret, 0);
	int fd = open("/dev/null", O_RDONLY);
	r = ioc(fd, SIO_FLUSH, NULL, 0, NULL, 0);
	EXPECT_FAIL(r, WSAENOTSOCK);
	close(fd);
	closesocket(bystander);
	closesocket(s);
}

static void *cancel_io_elsewhere(void *arg)
{
	SOCKET s = *(SOCKET *)arg;
	WSASetLastError(0);
	BOOL ok = CancelIo(REWIRE_SOCKET_HANDLE(s)); /* this thread issued nothing */
	return (void *)(intptr_t)(ok == FALSE && WSAGetLastError() == ERROR_NOT_FOUND);
}

static void cancel_io_aborts_pending_operations(void)
{
	unsigned char b1[256], b2[256];
	WSAOVERLAPPED o1, o2;
	SOCKET s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	HANDLE h = REWIRE_SOCKET_HANDLE(s);
	start_query(s, &o1, b1, 5000);
	start_query(s, &o2, b2, 5000);
	/* CancelIoEx with an OVERLAPPED cancels that one only */
	CHECK_EQ(CancelIoEx(h, &o1), TRUE);
	CHECK_EQ(o1.Internal, WSA_OPERATION_ABORTED);
	CHECK_EQ(o2.Internal, STATUS_PENDING);
	CHECK_EQ(finish(s, &o1), WSA_OPERATION_ABORTED);
	/* CancelIo on another thread leaves this thread's operation alone */
	pthread_t th;
	void *ok = NULL;
	CHECK(pthread_create(&th, NULL, cancel_io_elsewhere, &s) == 0);
	pthread_join(th, &ok);
	CHECK(ok != NULL);
	CHECK_EQ(o2.Internal, STATUS_PENDING);
	/* CancelIo on the issuing thread cancels it */
	CHECK_EQ(CancelIo(h), TRUE);
	CHECK_EQ(finish(s, &o2), WSA_OPERATION_ABORTED);
	/* nothing left */
	WSASetLastError(0);
	CHECK_EQ(CancelIoEx(h, NULL), FALSE);
	CHECK_EQ(WSAGetLastError(), ERROR_NOT_FOUND);
	/* CancelIoEx(NULL) cancels all; the socket stays usable */
	start_query(s, &o1, b1, 5000);
	start_query(s, &o2, b2, 5000);
	CHECK_EQ(CancelIoEx(h, NULL), TRUE);
	CHECK_EQ(finish(s, &o1), WSA_OPERATION_ABORTED);
	CHECK_EQ(finish(s, &o2), WSA_OPERATION_ABORTED);
	start_query(s, &o1, b1, 0);
	CHECK_EQ(finish(s, &o1), plain_tcp_code());
	/* not a socket */
	int fd = open("/dev/null", O_RDONLY);
	WSASetLastError(0);
	CHECK_EQ(CancelIoEx(REWIRE_SOCKET_HANDLE(fd), NULL), FALSE);
	CHECK_EQ(WSAGetLastError(), ERROR_INVALID_HANDLE);
	close(fd);
	closesocket(s);
}

/* ---- Control codes ------------------------------------------------------ */

static void control_code_values(void)
{
	CHECK_EQ(SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS, 0x980000DCu);
	CHECK_EQ(SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT, 0x980000DDu);
	CHECK_EQ(SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS, 0x980000DEu);
	CHECK_EQ(SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS, _WSAIOW(IOC_VENDOR, 220));
	CHECK_EQ(SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT, _WSAIOW(IOC_VENDOR, 221));
	CHECK_EQ(SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS, _WSAIOW(IOC_VENDOR, 222));
	CHECK_EQ(SIO_FLUSH, 0x28000004u);
	CHECK_EQ(SIO_GET_EXTENSION_FUNCTION_POINTER, 0xC8000006u);
	CHECK_EQ(SIO_KEEPALIVE_VALS, 0x98000004u);
	CHECK_EQ(FIONBIO, 0x8004667Eu);
	CHECK_EQ(SIO_ADDRESS_LIST_QUERY, 0x48000016u);
	CHECK_EQ(SIO_TCP_INFO, 0xD8000027u);
}

static const DWORD unserved[] = {
	FIONBIO, FIONREAD, FIOASYNC, SIOCATMARK, SIOCSHIWAT, SIOCGHIWAT, SIOCSLOWAT, SIOCGLOWAT,
	0x5421 /* Linux FIONBIO */, 0x541B /* Linux FIONREAD */, 0x5452 /* Linux FIOASYNC */,
	0x8905 /* Linux SIOCATMARK */,
	SIO_ASSOCIATE_HANDLE, SIO_ENABLE_CIRCULAR_QUEUEING, SIO_FIND_ROUTE, SIO_GET_BROADCAST_ADDRESS,
	SIO_GET_QOS, SIO_GET_GROUP_QOS, SIO_MULTIPOINT_LOOPBACK,
	SIO_MULTICAST_SCOPE, SIO_SET_QOS, SIO_SET_GROUP_QOS, SIO_TRANSLATE_HANDLE, SIO_ROUTING_INTERFACE_QUERY,
	SIO_ROUTING_INTERFACE_CHANGE, SIO_ADDRESS_LIST_QUERY, SIO_ADDRESS_LIST_CHANGE, SIO_QUERY_TARGET_PNP_HANDLE,
	SIO_ADDRESS_LIST_SORT, SIO_BSP_HANDLE, SIO_BSP_HANDLE_SELECT, SIO_BSP_HANDLE_POLL, SIO_EXT_SELECT,
	SIO_EXT_POLL, SIO_EXT_SENDMSG, SIO_BASE_HANDLE, SIO_QUERY_RSS_PROCESSOR_INFO, SIO_GET_INTERFACE_LIST,
	SIO_GET_INTERFACE_LIST_EX, SIO_SET_MULTICAST_FILTER, SIO_IDEAL_SEND_BACKLOG_QUERY,
	SIO_IDEAL_SEND_BACKLOG_CHANGE, SIO_RCVALL, SIO_RCVALL_MCAST, SIO_RCVALL_IGMPMCAST, SIO_KEEPALIVE_VALS,
	SIO_ABSORB_RTRALERT, SIO_UCAST_IF, SIO_LIMIT_BROADCASTS, SIO_INDEX_BIND, SIO_INDEX_MCASTIF,
	SIO_INDEX_ADD_MCAST, SIO_INDEX_DEL_MCAST, SIO_RCVALL_MCAST_IF, SIO_RCVALL_IF, SIO_LOOPBACK_FAST_PATH,
	SIO_TCP_INITIAL_RTO, SIO_APPLY_TRANSPORT_SETTING, SIO_QUERY_TRANSPORT_SETTING, SIO_CPU_AFFINITY,
	SIO_TCP_SET_ICW, SIO_TCP_SET_ACK_FREQUENCY, SIO_SET_PRIORITY_HINT, SIO_TCP_INFO,
	SIO_ACQUIRE_PORT_RESERVATION, SIO_RELEASE_PORT_RESERVATION, SIO_ASSOCIATE_PORT_RESERVATION,
	SIO_SET_SECURITY, SIO_QUERY_SECURITY, SIO_SET_PEER_TARGET_NAME, SIO_DELETE_PEER_TARGET_NAME,
	SIO_SOCKET_USAGE_NOTIFICATION, SIO_QUERY_WFP_ALE_ENDPOINT_HANDLE, SIO_QUERY_RSS_SCALABILITY_INFO,
	SIO_TIMESTAMPING,
};

static void unserved_windows_codes_are_eopnotsupp(void)
{
	unsigned char in[64], out[256];
	memset(in, 0, sizeof in);
	SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
	for (unsigned i = 0; i < sizeof unserved / sizeof unserved[0]; i++) {
		struct res r = ioc(s, unserved[i], in, sizeof in, out, sizeof out);
		if (r.err != WSAEOPNOTSUPP)
			fprintf(stderr, "    code 0x%08X\n", unserved[i]);
		EXPECT_FAIL(r, WSAEOPNOTSUPP);
	}
	/* values that are no control code */
	DWORD nocode[] = {0, 1, 0x980000DF, 0x98000000, 0x28000000, 0x12345678, 0xFFFFFFFF};
	for (unsigned i = 0; i < sizeof nocode / sizeof nocode[0]; i++) {
		struct res r = ioc(s, nocode[i], in, sizeof in, out, sizeof out);
		EXPECT_FAIL(r, WSAEINVAL);
	}
	closesocket(s);
}

static void malformed_blob_is_einval_on_any_socket(void)
{
	static unsigned char big[8192];
	unsigned char bad[REWIRE_WFP_MAX_RECORDS_SIZE + 1];
	REWIRE_WFP_RECORDS rec;
	SOCKET socks[3] = {socket(AF_INET, SOCK_STREAM, 0), socket(AF_INET6, SOCK_STREAM, 0),
			   socket(AF_INET, SOCK_DGRAM, 0)};
	for (int i = 0; i < 3; i++) {
		SOCKET s = socks[i];
		struct res r;
		memcpy(bad, sample_blob, sizeof sample_blob);
		bad[sizeof sample_blob] = 0;
		r = ioc(s, SETR, bad, sizeof sample_blob + 1, NULL, 0); /* one byte too long */
		EXPECT_FAIL(r, WSAEINVAL);
		r = ioc(s, SETR, bad, sizeof sample_blob - 1, NULL, 0); /* one byte short */
		EXPECT_FAIL(r, WSAEINVAL);
		r = ioc(s, SETR, bad, 4, NULL, 0);
		EXPECT_FAIL(r, WSAEINVAL);
		memcpy(big, sample_blob, sizeof sample_blob);
		r = ioc(s, SETR, big, 4097, NULL, 0); /* larger than the maximum */
		EXPECT_FAIL(r, WSAEINVAL);
		r = ioc(s, SETR, big, sizeof big, NULL, 0);
		EXPECT_FAIL(r, WSAEINVAL);
		memcpy(&rec, sample_blob, sizeof rec);
		rec.magic = 0x1234;
		r = ioc(s, SETR, &rec, sizeof rec, NULL, 0);
		EXPECT_FAIL(r, WSAEINVAL);
		memcpy(&rec, sample_blob, sizeof rec);
		rec.version = 9;
		r = ioc(s, SETR, &rec, sizeof rec, NULL, 0);
		EXPECT_FAIL(r, WSAEINVAL);
		memcpy(&rec, sample_blob, sizeof rec);
		rec.n_chain = 0;
		r = ioc(s, SETR, &rec, sizeof rec, NULL, 0);
		EXPECT_FAIL(r, WSAEINVAL);
		rec.n_chain = 17;
		r = ioc(s, SETR, &rec, sizeof rec, NULL, 0);
		EXPECT_FAIL(r, WSAEINVAL);
		memcpy(&rec, sample_blob, sizeof rec);
		rec.orig_dst.family = 99;
		r = ioc(s, SETR, &rec, sizeof rec, NULL, 0);
		EXPECT_FAIL(r, WSAEINVAL);
		closesocket(s);
	}
}

static void listening_socket_is_einval(void)
{
	unsigned char buf[256];
	SOCKET l = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a;
	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	CHECK(bind(l, (struct sockaddr *)&a, sizeof a) == 0 && listen(l, 4) == 0);
	struct res r = ioc(l, QREC, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, WSAEINVAL);
	r = ioc(l, QCTX, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, WSAEINVAL);
	r = ioc(l, SETR, sample_blob, sizeof sample_blob, NULL, 0);
	EXPECT_FAIL(r, WSAEINVAL);
	closesocket(l);
}

/* ---- Overlapped by default ---------------------------------------------- */

static void sockets_are_overlapped_by_default(void)
{
	unsigned char buf[256];
	WSAOVERLAPPED ov;
	/* socket() */
	SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
	start_query(s, &ov, buf, 0);
	CHECK_EQ(WSAWaitForMultipleEvents(1, &ov.hEvent, TRUE, 5000, FALSE), WSA_WAIT_EVENT_0);
	CHECK_EQ(finish(s, &ov), plain_tcp_code());
	/* accept() */
	SOCKET l = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in a;
	socklen_t alen = sizeof a;
	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	CHECK(bind(l, (struct sockaddr *)&a, sizeof a) == 0 && listen(l, 4) == 0);
	CHECK(getsockname(l, (struct sockaddr *)&a, &alen) == 0);
	SOCKET c = socket(AF_INET, SOCK_STREAM, 0);
	CHECK(connect(c, (struct sockaddr *)&a, sizeof a) == 0);
	SOCKET acc = accept(l, NULL, NULL);
	CHECK(acc >= 0);
	start_query(acc, &ov, buf, 0);
	CHECK_EQ(finish(acc, &ov), managed ? WSAEINVAL : WSAEOPNOTSUPP);
	/* lpcbBytesReturned may be NULL on an overlapped call */
	memset(&ov, 0, sizeof ov);
	WSASetLastError(0);
	CHECK_EQ(WSAIoctl(s, QREC, NULL, 0, buf, sizeof buf, NULL, &ov, NULL), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	CHECK_EQ(finish(s, &ov), plain_tcp_code());
	/* the switch: unmarked sockets non-overlapped; WSASocket's flag still counts */
	CHECK_EQ(rewire_wsa_set_default_overlapped(FALSE), TRUE);
	memset(&ov, 0, sizeof ov);
	DWORD n = 0xDEADBEEF;
	WSASetLastError(0);
	CHECK_EQ(WSAIoctl(s, QREC, NULL, 0, buf, sizeof buf, &n, &ov, NULL), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), plain_tcp_code());
	CHECK_EQ(ov.Internal, 0);
	SOCKET o = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	start_query(o, &ov, buf, 0);
	CHECK_EQ(finish(o, &ov), plain_tcp_code());
	CHECK_EQ(rewire_wsa_set_overlapped(s, TRUE), 0);
	start_query(s, &ov, buf, 0);
	CHECK_EQ(finish(s, &ov), plain_tcp_code());
	CHECK_EQ(rewire_wsa_set_default_overlapped(TRUE), FALSE);
	/* and a socket made non-overlapped stays so under the default */
	CHECK_EQ(rewire_wsa_set_overlapped(o, FALSE), 0);
	memset(&ov, 0, sizeof ov);
	WSASetLastError(0);
	CHECK_EQ(WSAIoctl(o, QREC, NULL, 0, buf, sizeof buf, &n, &ov, NULL), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), plain_tcp_code());
	closesocket(o);
	closesocket(acc);
	closesocket(c);
	closesocket(l);
	closesocket(s);
}

/* ---- Rules of the page not checked elsewhere ---------------------------- */

static void completion_routine_ignored_on_non_overlapped_socket(void)
{
	unsigned char buf[256];
	SOCKET s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, 0);
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	cr_calls = 0;
	DWORD n = 0xDEADBEEF;
	WSASetLastError(0);
	CHECK_EQ(WSAIoctl(s, QREC, NULL, 0, buf, sizeof buf, &n, &ov, completion), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), plain_tcp_code());
	CHECK_EQ(n, 0);
	CHECK_EQ(SleepEx(0, TRUE), 0); /* nothing queued */
	CHECK_EQ(cr_calls, 0);
	CHECK_EQ(ov.Internal, 0);
	/* SET too */
	n = 0xDEADBEEF;
	CHECK_EQ(WSAIoctl(s, SETR, sample_blob, sizeof sample_blob, NULL, 0, &n, &ov, completion), SOCKET_ERROR);
	CHECK(WSAGetLastError() != WSA_IO_PENDING);
	CHECK_EQ(SleepEx(0, TRUE), 0);
	CHECK_EQ(cr_calls, 0);
	closesocket(s);
}

static void unreadable_thread_id_is_efault(void)
{
	unsigned char buf[256];
	unsigned char *p = guard_page();
	long ps = page();
	SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
	DWORD n = 0xDEADBEEF;
	int e = 0;
	WSASetLastError(0);
	int ret = WSPIoctl(s, QREC, NULL, 0, buf, sizeof buf, &n, NULL, NULL, (LPWSATHREADID)(p + ps - 8), &e);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(e, WSAEFAULT);
	CHECK_EQ(WSAGetLastError(), WSAEFAULT);
	e = 0;
	ret = WSPIoctl(s, QREC, NULL, 0, buf, sizeof buf, &n, NULL, NULL, (LPWSATHREADID)(p + ps), &e);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(e, WSAEFAULT);
	munmap(p, ps);
	closesocket(s);
}

static void context_layout_switch(void)
{
	unsigned char buf[512];
	WSASetLastError(0);
	CHECK_EQ(rewire_wsa_set_context_layout(7), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEINVAL);
	CHECK_EQ(rewire_wsa_set_context_layout(REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS), REWIRE_WFP_CONTEXT_LAYOUT_SERVICE);
	SOCKET s = socket(AF_INET, SOCK_STREAM, 0);
	struct res r = ioc(s, QCTX, NULL, 0, buf, REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE - 1);
	EXPECT_FAIL(r, WSAEINVAL); /* 152 bytes no longer suffice */
	r = ioc(s, QCTX, NULL, 0, buf, REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE);
	EXPECT_FAIL(r, plain_tcp_code());
	CHECK_EQ(rewire_wsa_set_context_layout(REWIRE_WFP_CONTEXT_LAYOUT_REWIRE), REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS);
	r = ioc(s, QCTX, NULL, 0, buf, REWIRE_WFP_MAX_CONTEXT_SIZE);
	EXPECT_FAIL(r, plain_tcp_code());
	/* back to each service's configured layout (the default) */
	CHECK_EQ(rewire_wsa_set_context_layout(REWIRE_WFP_CONTEXT_LAYOUT_SERVICE), REWIRE_WFP_CONTEXT_LAYOUT_REWIRE);
	CHECK_EQ(rewire_wsa_set_context_layout(REWIRE_WFP_CONTEXT_LAYOUT_SERVICE), REWIRE_WFP_CONTEXT_LAYOUT_SERVICE);
	closesocket(s);
}

/* ------------------------------------------------------------------------ */
/* Rules that need a real redirected connection (kernel mode).              */

static int svc_port, dst_port;
static SOCKET l_svc4, l_svc6, l_dst4, l_dst6;

static SOCKET listener(int family, int port)
{
	SOCKET s = socket(family, SOCK_STREAM, 0);
	int one = 1;
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_storage ss;
	socklen_t len;
	memset(&ss, 0, sizeof ss);
	if (family == AF_INET) {
		struct sockaddr_in *a = (struct sockaddr_in *)&ss;
		a->sin_family = AF_INET;
		a->sin_port = htons(port);
		a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		len = sizeof *a;
	} else {
		struct sockaddr_in6 *a = (struct sockaddr_in6 *)&ss;
		a->sin6_family = AF_INET6;
		a->sin6_port = htons(port);
		a->sin6_addr = in6addr_loopback;
		len = sizeof *a;
	}
	if (bind(s, (struct sockaddr *)&ss, len) != 0 || listen(s, 64) != 0) {
		fprintf(stderr, "listen on port %d: %s\n", port, strerror(errno));
		exit(2);
	}
	return s;
}

static int loopback(int family, int port, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof *ss);
	if (family == AF_INET) {
		struct sockaddr_in *a = (struct sockaddr_in *)ss;
		a->sin_family = AF_INET;
		a->sin_port = htons(port);
		a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		return sizeof *a;
	}
	struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
	a->sin6_family = AF_INET6;
	a->sin6_port = htons(port);
	a->sin6_addr = in6addr_loopback;
	return sizeof *a;
}

/* accept() with a 5 s bound; -1 if nothing came. */
static SOCKET accept_within(SOCKET l, int ms)
{
	struct pollfd p = {.fd = l, .events = POLLIN};
	if (poll(&p, 1, ms) != 1)
		return -1;
	return accept(l, NULL, NULL);
}

/* The application connects to the original destination; the hook sends it
 * to our listener. On failure it says why and fails the running test. */
static int redirected_pair(int family, SOCKET *client, SOCKET *accepted)
{
	struct sockaddr_storage ss;
	int len = loopback(family, dst_port, &ss);
	*client = socket(family, SOCK_STREAM, 0);
	if (connect(*client, (struct sockaddr *)&ss, len) != 0) {
		fprintf(stderr, "    connect to original destination: %s\n", strerror(errno));
		test_ok = 0;
		return 0;
	}
	*accepted = accept_within(family == AF_INET ? l_svc4 : l_svc6, 5000);
	if (*accepted < 0) {
		fprintf(stderr, "    the connect was not redirected to the service listener\n");
		/* drain what reached the destination instead */
		SOCKET x = accept_within(family == AF_INET ? l_dst4 : l_dst6, 0);
		if (x >= 0)
			close(x);
		test_ok = 0;
		return 0;
	}
	return 1;
}

/* Connects the proxy's outbound socket to the original destination; 1 if it got there unredirected. */
static int onward_reaches_destination(int family, SOCKET out)
{
	struct sockaddr_storage ss;
	int len = loopback(family, dst_port, &ss);
	if (connect(out, (struct sockaddr *)&ss, len) != 0) {
		fprintf(stderr, "    onward connect: %s\n", strerror(errno));
		return 0;
	}
	SOCKET d = accept_within(family == AF_INET ? l_dst4 : l_dst6, 5000);
	SOCKET again = accept_within(family == AF_INET ? l_svc4 : l_svc6, 0);
	int ok = d >= 0 && again < 0;
	if (d >= 0)
		close(d);
	if (again >= 0)
		close(again);
	return ok;
}

static void query_records_succeeds(void)
{
	SOCKET c, a;
	if (!redirected_pair(AF_INET, &c, &a))
		return;
	unsigned char buf[REWIRE_WFP_MAX_RECORDS_SIZE];
	struct res r = ioc(a, QREC, NULL, 0, buf, sizeof buf);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	REWIRE_WFP_RECORDS rec;
	memcpy(&rec, buf, sizeof rec);
	CHECK_EQ(rec.magic, 0x5752);
	CHECK_EQ(rec.n_chain, 1);
	CHECK_EQ(rec.chain[0], 1);
	CHECK_EQ(rec.orig_dst.family, AF_INET);
	CHECK_EQ(ntohs(rec.orig_dst.port_be), dst_port);
	CHECK_EQ(rec.pid, getpid());
	/* a bigger buffer is fine; only the answer's size is reported */
	unsigned char big[4096];
	r = ioc(a, QREC, NULL, 0, big, sizeof big);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	CHECK(memcmp(big, buf, 120) == 0);
	closesocket(a);
	closesocket(c);
}

static void query_context_succeeds(void)
{
	SOCKET c, a;
	if (!redirected_pair(AF_INET6, &c, &a))
		return;
	REWIRE_WFP_CONTEXT ctx;
	struct res r = ioc(a, QCTX, NULL, 0, &ctx, sizeof ctx);
	EXPECT_OK(r, REWIRE_WFP_MAX_CONTEXT_SIZE);
	CHECK_EQ(ctx.magic, 0x5752);
	CHECK_EQ(ctx.state, REWIRE_WFP_REDIRECTED_BY_SELF);
	CHECK_EQ(ctx.service_id, 1);
	CHECK_EQ(ctx.hop, 1);
	CHECK_EQ(ctx.records.orig_dst.family, AF_INET6);
	CHECK_EQ(ntohs(ctx.records.orig_dst.port_be), dst_port);
	CHECK(memcmp(ctx.records.orig_dst.addr, &in6addr_loopback, 16) == 0);
	CHECK_EQ(ctx.records.pid, getpid());
	/* the context's records are the records blob */
	unsigned char rec[REWIRE_WFP_MAX_RECORDS_SIZE];
	r = ioc(a, QREC, NULL, 0, rec, sizeof rec);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	CHECK(memcmp(rec, &ctx.records, sizeof rec) == 0);
	closesocket(a);
	closesocket(c);
}

static void query_too_small_on_redirected_socket(void)
{
	SOCKET c, a;
	if (!redirected_pair(AF_INET, &c, &a))
		return;
	unsigned char buf[256];
	struct res r = ioc(a, QREC, NULL, 0, buf, REWIRE_WFP_MAX_RECORDS_SIZE - 1);
	EXPECT_FAIL(r, WSAEINVAL);
	r = ioc(a, QCTX, NULL, 0, buf, REWIRE_WFP_MAX_CONTEXT_SIZE - 1);
	EXPECT_FAIL(r, WSAEINVAL);
	r = ioc(a, QCTX, NULL, 0, buf, 2);
	EXPECT_FAIL(r, WSAEINVAL);
	closesocket(a);
	closesocket(c);
}

static void set_records_succeeds_and_flow_reaches_destination(void)
{
	SOCKET c, a;
	if (!redirected_pair(AF_INET, &c, &a))
		return;
	unsigned char blob[REWIRE_WFP_MAX_RECORDS_SIZE];
	struct res r = ioc(a, QREC, NULL, 0, blob, sizeof blob);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	SOCKET out = socket(AF_INET, SOCK_STREAM, 0);
	r = ioc(out, SETR, blob, sizeof blob, NULL, 0);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	CHECK(onward_reaches_destination(AF_INET, out));
	/* after connect the records can no longer be set */
	r = ioc(out, SETR, blob, sizeof blob, NULL, 0);
	EXPECT_FAIL(r, WSAEINVAL);
	closesocket(out);
	closesocket(a);
	closesocket(c);
}

static void tampered_or_truncated_blob_is_einval(void)
{
	SOCKET c, a;
	if (!redirected_pair(AF_INET, &c, &a))
		return;
	unsigned char blob[REWIRE_WFP_MAX_RECORDS_SIZE];
	struct res r = ioc(a, QREC, NULL, 0, blob, sizeof blob);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	SOCKET out = socket(AF_INET, SOCK_STREAM, 0);
	unsigned char bad[REWIRE_WFP_MAX_RECORDS_SIZE + 1];
	memcpy(bad, blob, sizeof blob);
	bad[9] ^= 0x40; /* flow_id */
	r = ioc(out, SETR, bad, sizeof blob, NULL, 0);
	EXPECT_FAIL(r, WSAEINVAL);
	memcpy(bad, blob, sizeof blob);
	bad[88] = 7; /* chain[0]: pretend another service handled it */
	r = ioc(out, SETR, bad, sizeof blob, NULL, 0);
	EXPECT_FAIL(r, WSAEINVAL);
	r = ioc(out, SETR, blob, sizeof blob - 1, NULL, 0); /* truncated */
	EXPECT_FAIL(r, WSAEINVAL);
	memcpy(bad, blob, sizeof blob);
	bad[sizeof blob] = 0;
	r = ioc(out, SETR, bad, sizeof bad, NULL, 0); /* trailing byte */
	EXPECT_FAIL(r, WSAEINVAL);
	r = ioc(out, SETR, sample_blob, sizeof sample_blob, NULL, 0); /* forged */
	EXPECT_FAIL(r, WSAEINVAL);
	closesocket(out);
	closesocket(a);
	closesocket(c);
}

static void query_on_connection_not_redirected_is_einval(void)
{
	SOCKET c, a;
	if (!redirected_pair(AF_INET, &c, &a))
		return;
	unsigned char blob[REWIRE_WFP_MAX_RECORDS_SIZE];
	struct res r = ioc(a, QREC, NULL, 0, blob, sizeof blob);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	/* the proxy's own onward connection arrives unredirected: no records */
	SOCKET out = socket(AF_INET, SOCK_STREAM, 0);
	r = ioc(out, SETR, blob, sizeof blob, NULL, 0);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	struct sockaddr_storage ss;
	int len = loopback(AF_INET, dst_port, &ss);
	CHECK(connect(out, (struct sockaddr *)&ss, len) == 0);
	SOCKET d = accept_within(l_dst4, 5000);
	CHECK(d >= 0);
	unsigned char buf[256];
	r = ioc(d, QREC, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, WSAEINVAL);
	r = ioc(d, QCTX, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, WSAEINVAL);
	/* nor does the application's side */
	r = ioc(c, QREC, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, WSAEINVAL);
	closesocket(d);
	closesocket(out);
	closesocket(a);
	closesocket(c);
}

static void udp_socket_is_einval(void)
{
	SOCKET u = socket(AF_INET, SOCK_DGRAM, 0);
	unsigned char buf[256];
	struct res r = ioc(u, QREC, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, WSAEINVAL);
	r = ioc(u, SETR, sample_blob, sizeof sample_blob, NULL, 0);
	EXPECT_FAIL(r, WSAEINVAL);
	closesocket(u);
}

/* This program is both the application and the redirect service
 * "conformance". The kernel gives a service's flows only to sockets one of
 * its processes bound (its cgroup <subtree>/services/<name>), and a
 * service's own connects skip it; so the program binds its service sockets
 * as the service and connects as an application, moving between the two
 * cgroups (it runs as root under `rewire run`, which sets REWIRE_CGROUP). */
static void as_service(int on)
{
	const char *cg = getenv("REWIRE_CGROUP");
	char path[4096];
	FILE *f;

	if (!cg)
		return;
	snprintf(path, sizeof path, "%s%s/cgroup.procs", cg, on ? "/services/conformance" : "");
	f = fopen(path, "w");
	if (!f || fprintf(f, "0\n") < 0 || fclose(f) != 0) {
		fprintf(stderr, "cannot join %s: %s\n", path, strerror(errno));
		exit(2);
	}
}

/* UDP, the Linux way: the query works on a socket bound to the service
 * address and connected to the datagram's source (the flow's "accepted"
 * socket); SET works on an unconnected UDP socket before connect(). */
static void udp_flow_socket_query_and_set_succeed(void)
{
	struct sockaddr_storage svc, dst, src;
	socklen_t srclen = sizeof src;
	int one = 1, svclen = loopback(AF_INET, svc_port, &svc), dstlen = loopback(AF_INET, dst_port, &dst);
	SOCKET l = socket(AF_INET, SOCK_DGRAM, 0), app = socket(AF_INET, SOCK_DGRAM, 0);
	setsockopt(l, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
	as_service(1);
	if (bind(l, (struct sockaddr *)&svc, svclen) != 0) {
		fprintf(stderr, "    bind UDP service port %d: %s\n", svc_port, strerror(errno));
		test_ok = 0;
	}
	as_service(0);
	CHECK(sendto(app, "q", 1, 0, (struct sockaddr *)&dst, dstlen) == 1);
	struct pollfd p = {.fd = l, .events = POLLIN};
	char c;
	if (poll(&p, 1, 5000) != 1 || recvfrom(l, &c, 1, 0, (struct sockaddr *)&src, &srclen) != 1) {
		fprintf(stderr, "    the datagram was not redirected to the service listener\n");
		test_ok = 0;
		goto out;
	}
	unsigned char buf[REWIRE_WFP_MAX_RECORDS_SIZE];
	struct res r = ioc(l, QREC, NULL, 0, buf, sizeof buf); /* the listener is not a flow */
	EXPECT_FAIL(r, WSAEINVAL);
	SOCKET f = socket(AF_INET, SOCK_DGRAM, 0);
	setsockopt(f, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
	as_service(1);
	CHECK(bind(f, (struct sockaddr *)&svc, svclen) == 0);
	as_service(0);
	CHECK(connect(f, (struct sockaddr *)&src, srclen) == 0);
	r = ioc(f, QREC, NULL, 0, buf, sizeof buf);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	REWIRE_WFP_RECORDS rec;
	memcpy(&rec, buf, sizeof rec);
	CHECK_EQ(rec.proto, IPPROTO_UDP);
	CHECK_EQ(ntohs(rec.orig_dst.port_be), dst_port);
	CHECK_EQ(rec.pid, getpid());
	SOCKET out = socket(AF_INET, SOCK_DGRAM, 0);
	r = ioc(out, SETR, buf, sizeof buf, NULL, 0);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	CHECK(connect(out, (struct sockaddr *)&dst, dstlen) == 0);
	closesocket(out);
	closesocket(f);
out:
	closesocket(app);
	closesocket(l);
}

static void unprivileged_caller_is_eacces(void)
{
	SOCKET c, a;
	if (!redirected_pair(AF_INET, &c, &a))
		return;
	unsigned char blob[REWIRE_WFP_MAX_RECORDS_SIZE];
	struct res r = ioc(a, QREC, NULL, 0, blob, sizeof blob);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	SOCKET out = socket(AF_INET, SOCK_STREAM, 0);
	fflush(NULL);
	pid_t pid = fork();
	if (pid == 0) {
		alarm(10);
		if (setgroups(0, NULL) != 0 || setresgid(65534, 65534, 65534) != 0 ||
		    setresuid(65534, 65534, 65534) != 0)
			_exit(3);
		test_ok = 1;
		unsigned char buf[256];
		struct res q = ioc(a, QREC, NULL, 0, buf, sizeof buf);
		EXPECT_FAIL(q, WSAEACCES);
		q = ioc(a, QCTX, NULL, 0, buf, sizeof buf);
		EXPECT_FAIL(q, WSAEACCES);
		q = ioc(out, SETR, blob, sizeof blob, NULL, 0);
		EXPECT_FAIL(q, WSAEACCES);
		_exit(test_ok ? 0 : 1);
	}
	int status = -1;
	CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
	/* the parent (root) still may */
	r = ioc(out, SETR, blob, sizeof blob, NULL, 0);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	closesocket(out);
	closesocket(a);
	closesocket(c);
}

static void overlapped_query_completes_through_event(void)
{
	SOCKET c, a;
	if (!redirected_pair(AF_INET, &c, &a))
		return;
	CHECK_EQ(rewire_wsa_set_overlapped(a, TRUE), 0);
	unsigned char buf[REWIRE_WFP_MAX_RECORDS_SIZE];
	memset(buf, 0, sizeof buf);
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	ov.hEvent = WSACreateEvent();
	DWORD n = 0xDEADBEEF, t = 0, fl = 77;
	WSASetLastError(0);
	int ret = WSAIoctl(a, QREC, NULL, 0, buf, sizeof buf, &n, &ov, NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	CHECK_EQ(n, 0);
	CHECK_EQ(WSAWaitForMultipleEvents(1, &ov.hEvent, TRUE, 5000, FALSE), WSA_WAIT_EVENT_0);
	WSASetLastError(0);
	CHECK_EQ(WSAGetOverlappedResult(a, &ov, &t, FALSE, &fl), TRUE);
	CHECK_EQ(WSAGetLastError(), 0);
	CHECK_EQ(t, REWIRE_WFP_MAX_RECORDS_SIZE);
	CHECK_EQ(fl, 0);
	CHECK_EQ(ov.Internal, 0);
	CHECK_EQ(ov.InternalHigh, REWIRE_WFP_MAX_RECORDS_SIZE);
	REWIRE_WFP_RECORDS rec;
	memcpy(&rec, buf, sizeof rec);
	CHECK_EQ(rec.magic, 0x5752);
	CHECK_EQ(ntohs(rec.orig_dst.port_be), dst_port);

	/* overlapped SET on an overlapped outbound socket, then the flow goes through */
	SOCKET out = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	WSAOVERLAPPED ov2;
	memset(&ov2, 0, sizeof ov2);
	ov2.hEvent = ov.hEvent;
	n = 0xDEADBEEF;
	ret = WSAIoctl(out, SETR, buf, sizeof buf, NULL, 0, &n, &ov2, NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	CHECK_EQ(n, 0);
	WSASetLastError(0);
	CHECK_EQ(WSAGetOverlappedResult(out, &ov2, &t, TRUE, &fl), TRUE);
	CHECK_EQ(WSAGetLastError(), 0);
	CHECK_EQ(t, REWIRE_WFP_MAX_RECORDS_SIZE);
	CHECK(onward_reaches_destination(AF_INET, out));
	WSACloseEvent(ov.hEvent);
	closesocket(out);
	closesocket(a);
	closesocket(c);
}

static void overlapped_context_query_runs_completion_routine(void)
{
	SOCKET c, a;
	if (!redirected_pair(AF_INET6, &c, &a))
		return;
	CHECK_EQ(rewire_wsa_set_overlapped(a, TRUE), 0);
	REWIRE_WFP_CONTEXT ctx;
	memset(&ctx, 0, sizeof ctx);
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	cr_calls = 0;
	cr_err = 12345;
	DWORD n = 0xDEADBEEF;
	int e = 0;
	int ret = WSPIoctl(a, QCTX, NULL, 0, &ctx, sizeof ctx, &n, &ov, completion, NULL, &e);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(e, WSA_IO_PENDING);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	CHECK_EQ(n, 0);
	DWORD w = SleepEx(5000, TRUE);
	CHECK_EQ(w, WAIT_IO_COMPLETION);
	CHECK_EQ(cr_calls, 1);
	CHECK_EQ(cr_err, 0);
	CHECK_EQ(cr_bytes, REWIRE_WFP_MAX_CONTEXT_SIZE);
	CHECK(cr_ov == &ov);
	CHECK(pthread_equal(cr_thread, pthread_self()));
	CHECK_EQ(ctx.state, REWIRE_WFP_REDIRECTED_BY_SELF);
	CHECK_EQ(ntohs(ctx.records.orig_dst.port_be), dst_port);
	/* closing an overlapped socket with nothing pending is a plain close */
	CHECK_EQ(closesocket(a), 0);
	closesocket(c);
}

static void overlapped_failure_in_kernel_completes_with_error(void)
{
	/* unprivileged isn't needed: a managed but unredirected socket answers WSAEINVAL */
	SOCKET s = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	unsigned char bad[REWIRE_WFP_MAX_RECORDS_SIZE];
	memcpy(bad, sample_blob, sizeof bad);
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	ov.hEvent = WSACreateEvent();
	DWORD n = 0xDEADBEEF, t = 77, fl = 0;
	int ret = WSAIoctl(s, SETR, bad, sizeof bad, NULL, 0, &n, &ov, NULL);
	CHECK_EQ(ret, SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	CHECK_EQ(n, 0);
	CHECK_EQ(WSAWaitForMultipleEvents(1, &ov.hEvent, TRUE, 5000, FALSE), WSA_WAIT_EVENT_0);
	WSASetLastError(0);
	CHECK_EQ(WSAGetOverlappedResult(s, &ov, &t, FALSE, &fl), FALSE);
	CHECK_EQ(WSAGetLastError(), WSAEINVAL);
	CHECK_EQ(t, 0);
	WSACloseEvent(ov.hEvent);
	closesocket(s);
}


/* ---- Kernel mode: descriptor identity on real flows, flush, socket types */

/* A pending query whose socket is closed and whose number then names
 * another redirected flow's socket must not return that flow's records. */
static void closed_socket_query_never_reads_another_flow(void)
{
	SOCKET c1, a1, c2, a2;
	if (!redirected_pair(AF_INET, &c1, &a1))
		return;
	unsigned char buf[REWIRE_WFP_MAX_RECORDS_SIZE];
	memset(buf, 0, sizeof buf);
	CHECK_EQ(rewire_wsa_set_overlapped(a1, TRUE), 0);
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	ov.hEvent = WSACreateEvent();
	DWORD n = 0xDEADBEEF;
	rewire_wsa_set_completion_delay(500);
	CHECK_EQ(WSAIoctl(a1, QREC, NULL, 0, buf, sizeof buf, &n, &ov, NULL), SOCKET_ERROR);
	rewire_wsa_set_completion_delay(0);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	SOCKET old = a1;
	close(a1);
	close(c1);
	/* the next flow's accepted socket takes the closed number */
	if (!redirected_pair(AF_INET, &c2, &a2))
		return;
	if (a2 != old) {
		fprintf(stderr, "    accepted socket got %d, closed one was %d\n", a2, old);
		test_ok = 0;
	}
	CHECK_EQ(finish(old, &ov), WSA_OPERATION_ABORTED);
	REWIRE_WFP_RECORDS zero;
	memset(&zero, 0, sizeof zero);
	CHECK(memcmp(buf, &zero, sizeof buf) == 0); /* nothing of the other flow written */
	/* the new flow's own query works */
	struct res r = ioc(a2, QREC, NULL, 0, buf, sizeof buf);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	closesocket(a2);
	closesocket(c2);
}

/* A pending SET whose socket is closed must not put the records on the
 * socket that next gets the number: that socket's connect is redirected
 * like any application's, not let through as the flow's onward connection. */
static void closed_socket_set_never_marks_another_socket(void)
{
	SOCKET c, a;
	if (!redirected_pair(AF_INET, &c, &a))
		return;
	unsigned char blob[REWIRE_WFP_MAX_RECORDS_SIZE];
	struct res r = ioc(a, QREC, NULL, 0, blob, sizeof blob);
	EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
	SOCKET out = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	DWORD n = 0xDEADBEEF;
	rewire_wsa_set_completion_delay(500);
	CHECK_EQ(WSAIoctl(out, SETR, blob, sizeof blob, NULL, 0, &n, &ov, NULL), SOCKET_ERROR);
	rewire_wsa_set_completion_delay(0);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	close(out);
	SOCKET other = socket(AF_INET, SOCK_STREAM, 0);
	CHECK_EQ(other, out);
	CHECK_EQ(finish(out, &ov), WSA_OPERATION_ABORTED);
	struct sockaddr_storage ss;
	int len = loopback(AF_INET, dst_port, &ss);
	CHECK(connect(other, (struct sockaddr *)&ss, len) == 0);
	SOCKET at_svc = accept_within(l_svc4, 5000);
	SOCKET at_dst = accept_within(l_dst4, 0);
	CHECK(at_svc >= 0); /* redirected: it carries no records */
	CHECK(at_dst < 0);
	if (at_svc >= 0)
		close(at_svc);
	if (at_dst >= 0)
		close(at_dst);
	closesocket(other);
	closesocket(a);
	closesocket(c);
}

static void sio_flush_on_redirected_socket_keeps_it_usable(void)
{
	SOCKET c, a;
	if (!redirected_pair(AF_INET6, &c, &a))
		return;
	unsigned char buf[REWIRE_WFP_MAX_CONTEXT_SIZE];
	CHECK_EQ(rewire_wsa_set_overlapped(a, TRUE), 0);
	WSAOVERLAPPED ov;
	memset(&ov, 0, sizeof ov);
	ov.hEvent = WSACreateEvent();
	DWORD n = 0xDEADBEEF;
	rewire_wsa_set_completion_delay(5000);
	CHECK_EQ(WSAIoctl(a, QCTX, NULL, 0, buf, sizeof buf, &n, &ov, NULL), SOCKET_ERROR);
	rewire_wsa_set_completion_delay(0);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	struct res r = ioc(a, SIO_FLUSH, NULL, 0, NULL, 0);
	CHECK_EQ(r.ret, 0);
	CHECK_EQ(finish(a, &ov), WSA_OPERATION_ABORTED);
	/* usable: synchronous and overlapped queries answer */
	r = ioc(a, QCTX, NULL, 0, buf, sizeof buf);
	EXPECT_OK(r, REWIRE_WFP_MAX_CONTEXT_SIZE);
	memset(&ov, 0, sizeof ov);
	ov.hEvent = WSACreateEvent();
	CHECK_EQ(WSAIoctl(a, QREC, NULL, 0, buf, sizeof buf, &n, &ov, NULL), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
	CHECK_EQ(finish(a, &ov), 0);
	CHECK_EQ(ov.InternalHigh, REWIRE_WFP_MAX_RECORDS_SIZE);
	closesocket(a);
	closesocket(c);
}

static void raw_and_listening_sockets_are_einval(void)
{
	unsigned char buf[256];
	int types[][2] = {{AF_INET, IPPROTO_TCP}, {AF_INET, IPPROTO_UDP}, {AF_INET6, IPPROTO_TCP}};
	for (int i = 0; i < 3; i++) {
		SOCKET s = socket(types[i][0], SOCK_RAW, types[i][1]);
		CHECK(s >= 0);
		if (s < 0)
			continue;
		struct res r = ioc(s, QREC, NULL, 0, buf, sizeof buf);
		EXPECT_FAIL(r, WSAEINVAL);
		r = ioc(s, QCTX, NULL, 0, buf, sizeof buf);
		EXPECT_FAIL(r, WSAEINVAL);
		r = ioc(s, SETR, sample_blob, sizeof sample_blob, NULL, 0);
		EXPECT_FAIL(r, WSAEINVAL);
		closesocket(s);
	}
	/* the service's own listener */
	struct res r = ioc(l_svc4, QREC, NULL, 0, buf, sizeof buf);
	EXPECT_FAIL(r, WSAEINVAL);
	r = ioc(l_svc6, SETR, sample_blob, sizeof sample_blob, NULL, 0);
	EXPECT_FAIL(r, WSAEINVAL);
}

/* The two-address context layout of Microsoft's sample callout. */
static void context_in_two_address_layout(void)
{
	int fams[2] = {AF_INET, AF_INET6};
	CHECK_EQ(rewire_wsa_set_context_layout(REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS), REWIRE_WFP_CONTEXT_LAYOUT_SERVICE);
	for (int i = 0; i < 2; i++) {
		SOCKET c, a;
		if (!redirected_pair(fams[i], &c, &a))
			break;
		struct sockaddr_storage ctx[2], app;
		socklen_t alen = sizeof app;
		CHECK_EQ(sizeof ctx, REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE);
		memset(ctx, 0xAA, sizeof ctx);
		struct res r = ioc(a, QCTX, NULL, 0, ctx, sizeof ctx);
		EXPECT_OK(r, REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE);
		CHECK(getsockname(c, (struct sockaddr *)&app, &alen) == 0);
		if (fams[i] == AF_INET) {
			struct sockaddr_in *rem = (struct sockaddr_in *)&ctx[0], *loc = (struct sockaddr_in *)&ctx[1];
			CHECK_EQ(rem->sin_family, AF_INET);
			CHECK_EQ(ntohs(rem->sin_port), dst_port);
			CHECK_EQ(ntohl(rem->sin_addr.s_addr), INADDR_LOOPBACK);
			CHECK_EQ(loc->sin_family, AF_INET);
			CHECK_EQ(loc->sin_port, ((struct sockaddr_in *)&app)->sin_port);
			CHECK_EQ(loc->sin_addr.s_addr, ((struct sockaddr_in *)&app)->sin_addr.s_addr);
		} else {
			struct sockaddr_in6 *rem = (struct sockaddr_in6 *)&ctx[0], *loc = (struct sockaddr_in6 *)&ctx[1];
			CHECK_EQ(rem->sin6_family, AF_INET6);
			CHECK_EQ(ntohs(rem->sin6_port), dst_port);
			CHECK(memcmp(&rem->sin6_addr, &in6addr_loopback, 16) == 0);
			CHECK_EQ(loc->sin6_family, AF_INET6);
			CHECK_EQ(loc->sin6_port, ((struct sockaddr_in6 *)&app)->sin6_port);
			CHECK(memcmp(&loc->sin6_addr, &((struct sockaddr_in6 *)&app)->sin6_addr, 16) == 0);
		}
		/* the records query is unchanged */
		unsigned char rec[REWIRE_WFP_MAX_RECORDS_SIZE];
		r = ioc(a, QREC, NULL, 0, rec, sizeof rec);
		EXPECT_OK(r, REWIRE_WFP_MAX_RECORDS_SIZE);
		/* a buffer for rewire's layout is too small for this one */
		r = ioc(a, QCTX, NULL, 0, ctx, REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE - 1);
		EXPECT_FAIL(r, WSAEINVAL);
		/* overlapped too */
		WSAOVERLAPPED ov;
		memset(&ov, 0, sizeof ov);
		memset(ctx, 0, sizeof ctx);
		DWORD n;
		CHECK_EQ(rewire_wsa_set_overlapped(a, TRUE), 0);
		CHECK_EQ(WSAIoctl(a, QCTX, NULL, 0, ctx, sizeof ctx, &n, &ov, NULL), SOCKET_ERROR);
		CHECK_EQ(WSAGetLastError(), WSA_IO_PENDING);
		CHECK_EQ(finish(a, &ov), 0);
		CHECK_EQ(ov.InternalHigh, REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE);
		CHECK_EQ(ctx[0].ss_family, fams[i]);
		closesocket(a);
		closesocket(c);
	}
	CHECK_EQ(rewire_wsa_set_context_layout(REWIRE_WFP_CONTEXT_LAYOUT_SERVICE), REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS);
}

/* Thread ids are reused: a completion routine of an exited thread must
 * never run on a later thread that gets the same id. The test makes the
 * reuse happen in a pid namespace of its own, where it sets the next id
 * (ns_last_pid of that namespace; the machine's own is not touched). */
static pid_t a_tid;
static WSAOVERLAPPED reuse_ov;
static unsigned char reuse_buf[256];
static SOCKET reuse_sock;

static void *issue_with_routine_and_exit(void *arg)
{
	(void)arg;
	DWORD n;
	a_tid = gettid();
	rewire_wsa_set_completion_delay(500);
	WSAIoctl(reuse_sock, QREC, NULL, 0, reuse_buf, sizeof reuse_buf, &n, &reuse_ov, completion);
	rewire_wsa_set_completion_delay(0);
	return NULL;
}

static void *same_tid_waits_alertably(void *arg)
{
	(void)arg;
	if (gettid() != a_tid)
		return (void *)1;
	if (SleepEx(0, TRUE) != 0)
		return (void *)2;
	return NULL;
}

static int tid_reuse_child(void)
{
	pthread_t t;
	void *res = (void *)9;
	reuse_sock = WSASocket(AF_INET, SOCK_STREAM, 0, NULL, 0, WSA_FLAG_OVERLAPPED);
	memset(&reuse_ov, 0, sizeof reuse_ov);
	cr_calls = 0;
	if (pthread_create(&t, NULL, issue_with_routine_and_exit, NULL) != 0)
		return 10;
	pthread_join(t, NULL);
	DWORD x, fl;
	/* the operation is over before the id is reused (aborted with its thread) */
	BOOL done = WSAGetOverlappedResult(reuse_sock, &reuse_ov, &x, TRUE, &fl);
	int err = done ? 0 : WSAGetLastError();
	FILE *f = fopen("/proc/sys/kernel/ns_last_pid", "w");
	if (!f || fprintf(f, "%d", a_tid - 1) < 0 || fclose(f) != 0)
		return 12;
	if (pthread_create(&t, NULL, same_tid_waits_alertably, NULL) != 0)
		return 13;
	pthread_join(t, &res);
	if (res != NULL)
		return 14 + (int)(intptr_t)res;
	if (cr_calls != 0)
		return 20; /* the exited thread's routine ran on the new one */
	return err == WSA_OPERATION_ABORTED ? 0 : 11;
}

static void routine_never_runs_on_thread_reusing_id(void)
{
	fflush(NULL);
	pid_t p1 = fork();
	if (p1 == 0) {
		if (unshare(CLONE_NEWPID) != 0)
			_exit(3);
		pid_t p2 = fork(); /* pid 1 of the new namespace */
		if (p2 == 0)
			_exit(tid_reuse_child());
		int st = -1;
		if (p2 < 0 || waitpid(p2, &st, 0) != p2)
			_exit(4);
		_exit(WIFEXITED(st) ? WEXITSTATUS(st) : 5);
	}
	int status = -1;
	for (int i = 0; i < 400; i++) { /* 20 s */
		if (waitpid(p1, &status, WNOHANG) == p1)
			break;
		usleep(50000);
		if (i == 399) {
			kill(p1, SIGKILL);
			waitpid(p1, &status, 0);
		}
	}
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		fprintf(stderr, "    child status %d (exit %d)\n", status, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
	CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

/* ---- WSARecvMsg / WSASendMsg (UDP, the WFP control messages) ------------ */

static LPFN_WSARECVMSG get_recvmsg(SOCKET s)
{
	GUID id = WSAID_WSARECVMSG;
	LPFN_WSARECVMSG fn = NULL;
	struct res r = ioc(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &id, sizeof id, &fn, sizeof fn);
	EXPECT_OK(r, sizeof fn);
	return fn;
}

static LPFN_WSASENDMSG get_sendmsg(SOCKET s)
{
	GUID id = WSAID_WSASENDMSG;
	LPFN_WSASENDMSG fn = NULL;
	struct res r = ioc(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &id, sizeof id, &fn, sizeof fn);
	EXPECT_OK(r, sizeof fn);
	return fn;
}

/* The lookup: the two GUIDs served, the other extension GUIDs WSAEOPNOTSUPP,
 * anything else WSAEINVAL; sizes and pointers checked first. */
static void extension_function_pointers(void)
{
	SOCKET s = socket(AF_INET, SOCK_DGRAM, 0);
	CHECK(get_recvmsg(s) == (LPFN_WSARECVMSG)rewire_wsa_recvmsg);
	CHECK(get_sendmsg(s) == (LPFN_WSASENDMSG)WSASendMsg);
	void *fn = NULL;
	GUID bad = {0x12345678, 1, 2, {3, 4, 5, 6, 7, 8, 9, 10}};
	struct res r = ioc(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &bad, sizeof bad, &fn, sizeof fn);
	EXPECT_FAIL(r, WSAEINVAL);
	GUID unserved_ids[] = {WSAID_ACCEPTEX, WSAID_CONNECTEX, WSAID_DISCONNECTEX, WSAID_GETACCEPTEXSOCKADDRS,
			       WSAID_TRANSMITFILE, WSAID_TRANSMITPACKETS};
	for (unsigned i = 0; i < sizeof unserved_ids / sizeof unserved_ids[0]; i++) {
		r = ioc(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &unserved_ids[i], sizeof(GUID), &fn, sizeof fn);
		EXPECT_FAIL(r, WSAEOPNOTSUPP);
	}
	GUID id = WSAID_WSARECVMSG;
	r = ioc(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &id, sizeof id - 1, &fn, sizeof fn);
	EXPECT_FAIL(r, WSAEINVAL);
	r = ioc(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &id, sizeof id, &fn, sizeof fn - 1);
	EXPECT_FAIL(r, WSAEFAULT);
	r = ioc(s, SIO_GET_EXTENSION_FUNCTION_POINTER, NULL, sizeof id, &fn, sizeof fn);
	EXPECT_FAIL(r, WSAEFAULT);
	r = ioc(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &id, sizeof id, NULL, sizeof fn);
	EXPECT_FAIL(r, WSAEFAULT);
	r = ioc(s, SIO_GET_EXTENSION_FUNCTION_POINTER, guard_page() + sysconf(_SC_PAGESIZE) - 4, sizeof id, &fn, sizeof fn);
	EXPECT_FAIL(r, WSAEFAULT);
	closesocket(s);
}

struct rmsg {
	int ret, err;
	DWORD bytes;
	WSAMSG msg;
	struct sockaddr_storage from;
	char data[64];
	char control[WSA_CMSG_SPACE(REWIRE_WFP_MAX_RECORDS_SIZE) + WSA_CMSG_SPACE(REWIRE_WFP_MAX_CONTEXT_SIZE)];
};

/* WSARecvMsg into r (data buffer `cap`, control buffer `ctl` bytes). */
static void recv_msg(LPFN_WSARECVMSG fn, SOCKET s, struct rmsg *r, ULONG cap, ULONG ctl)
{
	static WSABUF b;
	b.len = cap;
	b.buf = r->data;
	memset(&r->msg, 0, sizeof r->msg);
	r->msg.name = (struct sockaddr *)&r->from;
	r->msg.namelen = sizeof r->from;
	r->msg.lpBuffers = &b;
	r->msg.dwBufferCount = 1;
	r->msg.Control.len = ctl;
	r->msg.Control.buf = r->control;
	r->bytes = 0xDEADBEEF;
	WSASetLastError(0);
	r->ret = fn(s, &r->msg, &r->bytes, NULL, NULL);
	r->err = WSAGetLastError();
}

/* WSASendMsg of `len` bytes to `to` with control data `ctl` (ctl_len bytes). */
static struct res send_msg(LPFN_WSASENDMSG fn, SOCKET s, const void *data, ULONG len, struct sockaddr_storage *to,
			   int tolen, void *ctl, ULONG ctl_len, DWORD flags)
{
	WSABUF b = {len, (char *)data};
	WSAMSG m = {(struct sockaddr *)to, tolen, &b, 1, {ctl_len, ctl}, 0};
	struct res r;
	r.bytes = 0xDEADBEEF;
	WSASetLastError(0);
	r.ret = fn(s, &m, flags, &r.bytes, NULL, NULL);
	r.err = WSAGetLastError();
	return r;
}

/* A records control message around `blob` in buf; its size. */
static ULONG records_cmsg(char *buf, const void *blob, size_t len, int level, int type)
{
	memset(buf, 0, WSA_CMSG_SPACE(len));
	WSACMSGHDR *c = (WSACMSGHDR *)buf;
	c->cmsg_len = WSA_CMSG_LEN(len);
	c->cmsg_level = level;
	c->cmsg_type = type;
	memcpy(WSA_CMSG_DATA(c), blob, len);
	return (ULONG)WSA_CMSG_SPACE(len);
}

static SOCKET udp_bound(int family, int port, int enable)
{
	struct sockaddr_storage a;
	int len = loopback(family, port, &a);
	SOCKET s = socket(family, SOCK_DGRAM, IPPROTO_UDP);
	DWORD on = TRUE;
	int level = family == AF_INET ? IPPROTO_IP : IPPROTO_IPV6;
	if (enable) {
		CHECK_EQ(rewire_wsa_setsockopt(s, level, IP_WFP_REDIRECT_RECORDS, &on, sizeof on), 0);
		CHECK_EQ(rewire_wsa_setsockopt(s, level, IP_WFP_REDIRECT_CONTEXT, &on, sizeof on), 0);
	}
	if (bind(s, (struct sockaddr *)&a, len) != 0) {
		fprintf(stderr, "    bind UDP port %d: %s\n", port, strerror(errno));
		test_ok = 0;
	}
	return s;
}

static int port_of(SOCKET s)
{
	struct sockaddr_storage a;
	socklen_t len = sizeof a;
	getsockname(s, (struct sockaddr *)&a, &len);
	return ntohs(a.ss_family == AF_INET ? ((struct sockaddr_in *)&a)->sin_port : ((struct sockaddr_in6 *)&a)->sin6_port);
}

static int same_addr(const struct sockaddr_storage *a, const struct sockaddr_storage *b)
{
	if (a->ss_family != b->ss_family)
		return 0;
	if (a->ss_family == AF_INET) {
		const struct sockaddr_in *x = (const void *)a, *y = (const void *)b;
		return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
	}
	const struct sockaddr_in6 *x = (const void *)a, *y = (const void *)b;
	return x->sin6_port == y->sin6_port && memcmp(&x->sin6_addr, &y->sin6_addr, 16) == 0;
}

/* Without hooks: datagrams of one source, before and after its flow socket
 * exists, all come through WSARecvMsg on the listener (no control data: not
 * redirected); the reply goes back from the listener's address; the size,
 * flag, non-blocking and argument rules. */
static void recvmsg_rules_without_hooks(void)
{
	SOCKET l = udp_bound(AF_INET, 0, 1), app = socket(AF_INET, SOCK_DGRAM, 0);
	LPFN_WSARECVMSG rfn = get_recvmsg(l);
	LPFN_WSASENDMSG sfn = get_sendmsg(l);
	struct sockaddr_storage la, aa;
	int lalen = loopback(AF_INET, port_of(l), &la);
	static struct rmsg r;
	for (int i = 0; i < 3; i++) {
		CHECK(sendto(app, "hello", 5, 0, (struct sockaddr *)&la, lalen) == 5);
		recv_msg(rfn, l, &r, sizeof r.data, sizeof r.control);
		CHECK_EQ(r.ret, 0);
		CHECK_EQ(r.bytes, 5);
		CHECK(memcmp(r.data, "hello", 5) == 0);
		CHECK_EQ(r.msg.Control.len, 0);
		CHECK_EQ(r.msg.dwFlags, 0);
		CHECK_EQ(r.msg.namelen, sizeof(struct sockaddr_in));
	}
	socklen_t aalen = sizeof aa;
	getsockname(app, (struct sockaddr *)&aa, &aalen);
	CHECK_EQ(((struct sockaddr_in *)&r.from)->sin_port, ((struct sockaddr_in *)&aa)->sin_port);
	/* the reply, from the listener's address */
	struct res s = send_msg(sfn, l, "back", 4, &r.from, r.msg.namelen, NULL, 0, 0);
	EXPECT_OK(s, 4);
	struct sockaddr_storage from;
	socklen_t fromlen = sizeof from;
	char buf[16];
	struct pollfd p = {.fd = app, .events = POLLIN};
	CHECK(poll(&p, 1, 5000) == 1 && recvfrom(app, buf, sizeof buf, 0, (struct sockaddr *)&from, &fromlen) == 4);
	CHECK(same_addr(&from, &la));
	/* a datagram larger than the buffer: the part that fits, MSG_TRUNC, WSAEMSGSIZE */
	CHECK(sendto(app, "0123456789", 10, 0, (struct sockaddr *)&la, lalen) == 10);
	recv_msg(rfn, l, &r, 4, sizeof r.control);
	CHECK_EQ(r.ret, SOCKET_ERROR);
	CHECK_EQ(r.err, WSAEMSGSIZE);
	CHECK_EQ(r.bytes, 4);
	CHECK(memcmp(r.data, "0123", 4) == 0);
	CHECK(r.msg.dwFlags & MSG_TRUNC);
	/* non-blocking, nothing queued */
	fcntl(l, F_SETFL, fcntl(l, F_GETFL) | O_NONBLOCK);
	recv_msg(rfn, l, &r, sizeof r.data, sizeof r.control);
	CHECK_EQ(r.ret, SOCKET_ERROR);
	CHECK_EQ(r.err, WSAEWOULDBLOCK);
	CHECK_EQ(r.bytes, 0);
	/* input flags (MSG_PEEK): not served */
	WSABUF b = {sizeof r.data, r.data};
	WSAMSG m = {NULL, 0, &b, 1, {0, NULL}, MSG_PEEK};
	DWORD n = 7;
	CHECK_EQ(rfn(l, &m, &n, NULL, NULL), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEOPNOTSUPP);
	CHECK_EQ(n, 0);
	/* a bad WSAMSG, a non-socket, a TCP socket */
	CHECK_EQ(rfn(l, (LPWSAMSG)(guard_page() + sysconf(_SC_PAGESIZE) - 8), &n, NULL, NULL), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEFAULT);
	m.dwFlags = 0;
	int fd = open("/dev/null", O_RDONLY);
	CHECK_EQ(rfn(fd, &m, &n, NULL, NULL), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAENOTSOCK);
	close(fd);
	SOCKET t = socket(AF_INET, SOCK_STREAM, 0);
	CHECK_EQ(rfn(t, &m, &n, NULL, NULL), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEOPNOTSUPP);
	/* the options: a DWORD on a UDP socket */
	DWORD on = TRUE;
	CHECK_EQ(rewire_wsa_setsockopt(t, IPPROTO_IP, IP_WFP_REDIRECT_RECORDS, &on, sizeof on), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEINVAL);
	CHECK_EQ(rewire_wsa_setsockopt(l, IPPROTO_IP, IP_WFP_REDIRECT_RECORDS, &on, 2), SOCKET_ERROR);
	CHECK_EQ(WSAGetLastError(), WSAEFAULT);
	closesocket(t);
	closesocket(app);
	closesocket(l);
}

/* WSASendMsg's checks, before anything is sent: control messages and flags. */
static void sendmsg_rules_without_hooks(void)
{
	SOCKET o = socket(AF_INET, SOCK_DGRAM, 0), d = udp_bound(AF_INET, 0, 0);
	LPFN_WSASENDMSG sfn = get_sendmsg(o);
	struct sockaddr_storage da;
	int dalen = loopback(AF_INET, port_of(d), &da);
	char ctl[WSA_CMSG_SPACE(REWIRE_WFP_MAX_RECORDS_SIZE)];
	unsigned char bad[REWIRE_WFP_MAX_RECORDS_SIZE];
	memcpy(bad, sample_blob, sizeof bad);
	bad[0] ^= 0xFF; /* magic */
	ULONG cl = records_cmsg(ctl, bad, sizeof bad, IPPROTO_IP, IP_WFP_REDIRECT_RECORDS);
	struct res r = send_msg(sfn, o, "x", 1, &da, dalen, ctl, cl, 0);
	EXPECT_FAIL(r, WSAEINVAL);
	cl = records_cmsg(ctl, sample_blob, 100, IPPROTO_IP, IP_WFP_REDIRECT_RECORDS); /* truncated */
	r = send_msg(sfn, o, "x", 1, &da, dalen, ctl, cl, 0);
	EXPECT_FAIL(r, WSAEINVAL);
	cl = records_cmsg(ctl, sample_blob, sizeof sample_blob, IPPROTO_IP, IP_WFP_REDIRECT_CONTEXT); /* another message */
	r = send_msg(sfn, o, "x", 1, &da, dalen, ctl, cl, 0);
	EXPECT_FAIL(r, WSAEOPNOTSUPP);
	cl = records_cmsg(ctl, sample_blob, sizeof sample_blob, IPPROTO_IP, IP_WFP_REDIRECT_RECORDS);
	((WSACMSGHDR *)ctl)->cmsg_len = 4096; /* longer than the buffer */
	r = send_msg(sfn, o, "x", 1, &da, dalen, ctl, cl, 0);
	EXPECT_FAIL(r, WSAEINVAL);
	r = send_msg(sfn, o, "x", 1, &da, dalen, NULL, 0, MSG_DONTROUTE);
	EXPECT_FAIL(r, WSAEOPNOTSUPP);
	/* well-formed records on a socket no rewire hooks serve: the kernel's answer */
	cl = records_cmsg(ctl, sample_blob, sizeof sample_blob, IPPROTO_IP, IP_WFP_REDIRECT_RECORDS);
	r = send_msg(sfn, o, "x", 1, &da, dalen, ctl, cl, 0);
	EXPECT_FAIL(r, managed ? WSAEINVAL : WSAEOPNOTSUPP);
	/* no control data: a plain sendto */
	SOCKET o2 = socket(AF_INET, SOCK_DGRAM, 0);
	r = send_msg(sfn, o2, "hi", 2, &da, dalen, NULL, 0, 0);
	EXPECT_OK(r, 2);
	char buf[8];
	struct pollfd p = {.fd = d, .events = POLLIN};
	CHECK(poll(&p, 1, 5000) == 1 && recv(d, buf, sizeof buf, 0) == 2);
	closesocket(o2);
	closesocket(o);
	closesocket(d);
}

/* Under rewire: WSARecvMsg on the service's UDP socket returns the flow's
 * records and context as IP_WFP_REDIRECT_RECORDS / _CONTEXT control messages
 * (MSG_CTRUNC when they do not fit); WSASendMsg with the records carries the
 * datagram to the original destination, and the reply sent with WSASendMsg
 * on the service socket reaches the application from that destination. */
static void udp_control_messages_one_family(int fam)
{
	int lvl = fam == AF_INET ? IPPROTO_IP : IPPROTO_IPV6;
	as_service(1);
	SOCKET l = udp_bound(fam, svc_port, 1);
	as_service(0);
	SOCKET app = socket(fam, SOCK_DGRAM, 0), dst = udp_bound(fam, dst_port, 0);
	LPFN_WSARECVMSG rfn = get_recvmsg(l);
	LPFN_WSASENDMSG sfn = get_sendmsg(l);
	struct sockaddr_storage da;
	int dalen = loopback(fam, dst_port, &da);
	static struct rmsg r;
	CHECK(sendto(app, "ping", 4, 0, (struct sockaddr *)&da, dalen) == 4);
	as_service(1);
	recv_msg(rfn, l, &r, sizeof r.data, sizeof r.control);
	CHECK_EQ(r.ret, 0);
	CHECK_EQ(r.bytes, 4);
	CHECK_EQ(r.msg.dwFlags, 0);
	CHECK_EQ(r.msg.Control.len, WSA_CMSG_SPACE(REWIRE_WFP_MAX_RECORDS_SIZE) + WSA_CMSG_LEN(REWIRE_WFP_MAX_CONTEXT_SIZE));
	unsigned char records[REWIRE_WFP_MAX_RECORDS_SIZE];
	int got = 0;
	for (WSACMSGHDR *c = WSA_CMSG_FIRSTHDR(&r.msg); c; c = WSA_CMSG_NXTHDR(&r.msg, c)) {
		CHECK_EQ(c->cmsg_level, lvl);
		if (c->cmsg_type == IP_WFP_REDIRECT_RECORDS) {
			CHECK_EQ(c->cmsg_len, WSA_CMSG_LEN(REWIRE_WFP_MAX_RECORDS_SIZE));
			memcpy(records, WSA_CMSG_DATA(c), sizeof records);
			REWIRE_WFP_RECORDS rec;
			memcpy(&rec, records, sizeof rec);
			CHECK_EQ(rec.proto, IPPROTO_UDP);
			CHECK_EQ(ntohs(rec.orig_dst.port_be), dst_port);
			CHECK_EQ(rec.pid, getpid());
			got |= 1;
		} else if (c->cmsg_type == IP_WFP_REDIRECT_CONTEXT) {
			CHECK_EQ(c->cmsg_len, WSA_CMSG_LEN(REWIRE_WFP_MAX_CONTEXT_SIZE));
			REWIRE_WFP_CONTEXT ctx;
			memcpy(&ctx, WSA_CMSG_DATA(c), sizeof ctx);
			CHECK_EQ(ctx.state, REWIRE_WFP_REDIRECTED_BY_SELF);
			CHECK_EQ(ctx.records.proto, IPPROTO_UDP);
			got |= 2;
		}
	}
	CHECK_EQ(got, 3);
	/* room for the records only; then none */
	as_service(0);
	CHECK(sendto(app, "p2", 2, 0, (struct sockaddr *)&da, dalen) == 2);
	CHECK(sendto(app, "p3", 2, 0, (struct sockaddr *)&da, dalen) == 2);
	as_service(1);
	recv_msg(rfn, l, &r, sizeof r.data, WSA_CMSG_SPACE(REWIRE_WFP_MAX_RECORDS_SIZE));
	CHECK_EQ(r.ret, 0);
	CHECK(r.msg.dwFlags & MSG_CTRUNC);
	CHECK_EQ(r.msg.Control.len, WSA_CMSG_SPACE(REWIRE_WFP_MAX_RECORDS_SIZE));
	CHECK_EQ(((WSACMSGHDR *)r.control)->cmsg_type, IP_WFP_REDIRECT_RECORDS);
	recv_msg(rfn, l, &r, sizeof r.data, 0);
	CHECK_EQ(r.ret, 0);
	CHECK_EQ(r.bytes, 2);
	CHECK(r.msg.dwFlags & MSG_CTRUNC);
	CHECK_EQ(r.msg.Control.len, 0);
	/* onward with the records: reaches the destination */
	SOCKET o = socket(fam, SOCK_DGRAM, IPPROTO_UDP);
	char ctl[WSA_CMSG_SPACE(REWIRE_WFP_MAX_RECORDS_SIZE)];
	ULONG cl = records_cmsg(ctl, records, sizeof records, lvl, IP_WFP_REDIRECT_RECORDS);
	struct res s = send_msg(sfn, o, "ping", 4, &da, dalen, ctl, cl, 0);
	EXPECT_OK(s, 4);
	s = send_msg(sfn, o, "ping", 4, &da, dalen, ctl, cl, 0); /* the same records again */
	EXPECT_OK(s, 4);
	cl = records_cmsg(ctl, sample_blob, sizeof sample_blob, lvl, IP_WFP_REDIRECT_RECORDS);
	s = send_msg(sfn, o, "ping", 4, &da, dalen, ctl, cl, 0); /* other records on the same socket */
	EXPECT_FAIL(s, WSAEINVAL);
	/* the records reach the kernel, which checks their tag */
	SOCKET o3 = socket(fam, SOCK_DGRAM, IPPROTO_UDP);
	unsigned char tampered[REWIRE_WFP_MAX_RECORDS_SIZE];
	memcpy(tampered, records, sizeof tampered);
	tampered[sizeof tampered - 1] ^= 1;
	cl = records_cmsg(ctl, tampered, sizeof tampered, lvl, IP_WFP_REDIRECT_RECORDS);
	s = send_msg(sfn, o3, "ping", 4, &da, dalen, ctl, cl, 0);
	EXPECT_FAIL(s, WSAEINVAL);
	closesocket(o3);
	as_service(0);
	char buf[16];
	struct sockaddr_storage from;
	socklen_t fromlen = sizeof from;
	struct pollfd p = {.fd = dst, .events = POLLIN};
	CHECK(poll(&p, 1, 5000) == 1 && recvfrom(dst, buf, sizeof buf, 0, (struct sockaddr *)&from, &fromlen) == 4);
	CHECK(sendto(dst, "pong", 4, 0, (struct sockaddr *)&from, fromlen) == 4);
	as_service(1);
	p.fd = o;
	CHECK(poll(&p, 1, 5000) == 1 && recv(o, buf, sizeof buf, 0) == 4);
	/* the reply to the application, through the service socket */
	s = send_msg(sfn, l, "pong", 4, &r.from, r.msg.namelen, NULL, 0, 0);
	EXPECT_OK(s, 4);
	as_service(0);
	fromlen = sizeof from;
	p.fd = app;
	CHECK(poll(&p, 1, 5000) == 1 && recvfrom(app, buf, sizeof buf, 0, (struct sockaddr *)&from, &fromlen) == 4);
	CHECK(memcmp(buf, "pong", 4) == 0);
	CHECK(same_addr(&from, &da)); /* from the original destination */
	closesocket(o);
	closesocket(dst);
	closesocket(app);
	closesocket(l);
}

static void udp_control_messages_carry_a_flow(void)
{
	udp_control_messages_one_family(AF_INET);
	udp_control_messages_one_family(AF_INET6);
}

int main(int argc, char **argv)
{
	alarm(120); /* the whole suite is bounded */
	init_sample_blob();
	if (argc == 4 && strcmp(argv[1], "--kernel") == 0) {
		managed = 1;
		svc_port = atoi(argv[2]);
		dst_port = atoi(argv[3]);
	} else if (argc != 1) {
		fprintf(stderr, "usage: %s [--kernel SERVICE_PORT DESTINATION_PORT]\n", argv[0]);
		return 2;
	}

	RUN(unknown_control_code_is_einval);
	RUN(non_socket_is_enotsock);
	RUN(unix_socket_is_eopnotsupp);
	RUN(plain_tcp_socket_query_fails);
	RUN(output_buffer_too_small_is_einval_with_zero_bytes);
	RUN(set_needs_zero_output_size);
	RUN(null_or_unmapped_output_is_efault);
	RUN(null_or_unmapped_input_is_efault);
	RUN(bad_bytes_returned_pointer_is_efault);
	RUN(overlapped_argument_checks_are_synchronous);
	RUN(non_overlapped_socket_ignores_lpoverlapped);
	RUN(overlapped_error_completes_through_event);
	RUN(overlapped_pending_is_incomplete_until_done);
	RUN(closesocket_aborts_pending_event);
	RUN(closesocket_aborts_pending_completion_routine);
	RUN(last_error_is_per_thread);
	RUN(events_and_waits);
	RUN(closesocket_and_overlapped_mark_need_a_socket);
	RUN(wspioctl_reports_through_lperrno);
	RUN(closed_number_reused_starts_fresh);
	RUN(pending_operation_of_closed_socket_is_aborted);
	RUN(fork_child_runs_its_own_operations);
	RUN(exited_thread_operations_are_aborted);
	RUN(sio_flush_aborts_pending_and_socket_stays_usable);
	RUN(cancel_io_aborts_pending_operations);
	RUN(control_code_values);
	RUN(unserved_windows_codes_are_eopnotsupp);
	RUN(malformed_blob_is_einval_on_any_socket);
	RUN(listening_socket_is_einval);
	RUN(sockets_are_overlapped_by_default);
	RUN(completion_routine_ignored_on_non_overlapped_socket);
	RUN(unreadable_thread_id_is_efault);
	RUN(context_layout_switch);
	RUN(extension_function_pointers);
	RUN(recvmsg_rules_without_hooks);
	RUN(sendmsg_rules_without_hooks);

	if (managed) {
		as_service(1);
		l_svc4 = listener(AF_INET, svc_port);
		l_svc6 = listener(AF_INET6, svc_port);
		as_service(0);
		l_dst4 = listener(AF_INET, dst_port);
		l_dst6 = listener(AF_INET6, dst_port);
		RUN(query_records_succeeds);
		RUN(query_context_succeeds);
		RUN(query_too_small_on_redirected_socket);
		RUN(set_records_succeeds_and_flow_reaches_destination);
		RUN(tampered_or_truncated_blob_is_einval);
		RUN(query_on_connection_not_redirected_is_einval);
		RUN(udp_socket_is_einval);
		RUN(udp_flow_socket_query_and_set_succeed);
		RUN(unprivileged_caller_is_eacces);
		RUN(overlapped_query_completes_through_event);
		RUN(overlapped_context_query_runs_completion_routine);
		RUN(overlapped_failure_in_kernel_completes_with_error);
		RUN(closed_socket_query_never_reads_another_flow);
		RUN(closed_socket_set_never_marks_another_socket);
		RUN(sio_flush_on_redirected_socket_keeps_it_usable);
		RUN(raw_and_listening_sockets_are_einval);
		RUN(routine_never_runs_on_thread_reusing_id);
		RUN(context_in_two_address_layout);
		RUN(udp_control_messages_carry_a_flow);
	}
	printf("# %d failed\n", failures);
	return failures ? 1 : 0;
}
