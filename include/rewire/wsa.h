/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * rewire/wsa.h: the Windows Sockets surface of rewire.
 *
 * A Windows Filtering Platform redirect service calls
 *
 *   WSAIoctl(s, SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS, ...)  on the accepted socket
 *   WSAIoctl(s, SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT, ...)  on the accepted socket
 *   WSAIoctl(s, SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS, ...)    on its new outbound socket
 *
 * This header declares the same calls, types, control codes and error codes
 * for Linux, served by librewire_wsa (link with `-lrewire_wsa`, or
 * `pkg-config --libs rewire-wsa`). The sockets must be created inside a
 * rewire-managed cgroup (`rewire run` / `rewire exec`), where rewire's eBPF
 * hooks redirect connections and answer the queries.
 *
 * Differences from Windows, all deliberate:
 *  - SOCKET is a Linux file descriptor (int). Use closesocket() for sockets
 *    that may have overlapped operations pending, so they are cancelled.
 *  - A socket is overlapped when created with WSASocket(..., WSA_FLAG_OVERLAPPED)
 *    or marked with rewire_wsa_set_overlapped(); sockets from socket() and
 *    accept() are not overlapped until marked.
 *  - A too-small output buffer fails with WSAEINVAL and *lpcbBytesReturned = 0
 *    (as the SET page of the specification says; the query pages' alternative
 *    ERROR_INSUFFICIENT_BUFFER is not used). Size buffers with
 *    REWIRE_WFP_MAX_RECORDS_SIZE / REWIRE_WFP_MAX_CONTEXT_SIZE.
 *  - WSAOVERLAPPED.Internal holds STATUS_PENDING while pending, then 0 or the
 *    WSA error code (Windows stores an NTSTATUS there).
 *  - WSAEINPROGRESS and WSAEINTR exist for source compatibility; the calls
 *    never block, so they are not returned in practice.
 *
 * Pointer arguments are probed with process_vm_readv/process_vm_writev on
 * the calling process, never dereferenced: a NULL pointer where data is
 * needed, or a range not wholly inside valid (readable; for outputs,
 * writable) memory, fails with WSAEFAULT instead of crashing.
 */
#ifndef REWIRE_WSA_H
#define REWIRE_WSA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- Windows types ----------------------------------------------------- */

typedef int SOCKET;            /* a Linux file descriptor */
typedef uint32_t DWORD;
typedef DWORD *LPDWORD;
typedef uint32_t ULONG;
typedef uintptr_t ULONG_PTR;
typedef uintptr_t DWORD_PTR;
typedef int BOOL;
typedef int INT;
typedef int *LPINT;
typedef void *LPVOID;
typedef void *HANDLE;
typedef HANDLE WSAEVENT;
typedef WSAEVENT *LPWSAEVENT;

#ifndef TRUE
#define TRUE 1
#endif
#ifndef FALSE
#define FALSE 0
#endif
#ifndef WSAAPI
#define WSAAPI
#endif
#ifndef CALLBACK
#define CALLBACK
#endif

#define INVALID_SOCKET ((SOCKET)-1)
#define SOCKET_ERROR (-1)

/* Layout of OVERLAPPED on 64-bit Windows. */
typedef struct _WSAOVERLAPPED {
	ULONG_PTR Internal;     /* STATUS_PENDING while pending, then 0 or a WSA error code */
	ULONG_PTR InternalHigh; /* bytes transferred, once complete */
	union {
		struct {
			DWORD Offset;     /* unused by these calls */
			DWORD OffsetHigh; /* unused by these calls */
		};
		void *Pointer;
	};
	WSAEVENT hEvent; /* signalled at completion when no completion routine is given */
} WSAOVERLAPPED, *LPWSAOVERLAPPED;

typedef void(CALLBACK *LPWSAOVERLAPPED_COMPLETION_ROUTINE)(DWORD dwError, DWORD cbTransferred,
							  LPWSAOVERLAPPED lpOverlapped, DWORD dwFlags);

typedef struct _WSATHREADID {
	HANDLE ThreadHandle;
	DWORD_PTR Reserved;
} WSATHREADID, *LPWSATHREADID;

#ifndef STATUS_PENDING
#define STATUS_PENDING ((ULONG_PTR)0x103)
#endif
#define HasOverlappedIoCompleted(lpOverlapped) ((lpOverlapped)->Internal != STATUS_PENDING)

/* ---- Control codes (mstcpip.h: _WSAIOW(IOC_VENDOR, N)) ----------------- */

#define SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS ((DWORD)0x980000DC) /* N = 220 */
#define SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT ((DWORD)0x980000DD) /* N = 221 */
#define SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS ((DWORD)0x980000DE)   /* N = 222 */

/* ---- Error codes -------------------------------------------------------- */

#define WSA_INVALID_HANDLE 6        /* not an event handle of this library */
#define WSA_INVALID_PARAMETER 87    /* e.g. event count 0 or > WSA_MAXIMUM_WAIT_EVENTS */
#define WSA_OPERATION_ABORTED 995   /* overlapped operation cancelled by closesocket() */
#define WSA_IO_INCOMPLETE 996       /* WSAGetOverlappedResult(fWait = FALSE) on a pending operation */
#define WSA_IO_PENDING 997          /* overlapped operation started; completes later */
#define WSAEINTR 10004
#define WSAEACCES 10013             /* caller is neither root nor granted in the config's [access] */
#define WSAEFAULT 10014             /* a pointer argument is NULL or not wholly in valid memory */
#define WSAEINVAL 10022             /* bad control code, bad input, wrong socket type/state, buffer too small */
#define WSAEINPROGRESS 10036
#define WSAENOTSOCK 10038           /* s is not a (open) socket */
#define WSAEOPNOTSUPP 10045         /* transport cannot carry records (Unix socket), or no rewire hooks serve s */
#define WSAENETDOWN 10050

/* ---- Events and waits --------------------------------------------------- */

#define WSA_WAIT_EVENT_0 ((DWORD)0)
#define WSA_WAIT_IO_COMPLETION ((DWORD)0xC0)
#define WAIT_IO_COMPLETION WSA_WAIT_IO_COMPLETION
#define WSA_WAIT_TIMEOUT ((DWORD)258)
#define WSA_WAIT_FAILED ((DWORD)0xFFFFFFFF)
#define WSA_INFINITE ((DWORD)0xFFFFFFFF)
#define WSA_MAXIMUM_WAIT_EVENTS 64
#define WSA_INVALID_EVENT ((WSAEVENT)NULL)

#define WSA_FLAG_OVERLAPPED 0x01

/* ---- What the queries return -------------------------------------------- */

/* Size of the records blob: a buffer this big always holds the records answer. */
#define REWIRE_WFP_MAX_RECORDS_SIZE 128
/* Size of the context: a buffer this big always holds the context answer. */
#define REWIRE_WFP_MAX_CONTEXT_SIZE 152

/* Redirect states (FWP_CONNECTION_REDIRECT_STATE). */
#define REWIRE_WFP_NOT_REDIRECTED 0
#define REWIRE_WFP_REDIRECTED_BY_SELF 1
#define REWIRE_WFP_REDIRECTED_BY_OTHER 2
#define REWIRE_WFP_PREVIOUSLY_REDIRECTED_BY_SELF 3

/* An address as the kernel hooks store it (mirrors struct rw_addr). */
typedef struct rewire_wfp_addr {
	uint8_t family;   /* AF_INET or AF_INET6 */
	uint8_t _pad;
	uint16_t port_be; /* network byte order, like sin_port */
	uint32_t _pad2;
	uint8_t addr[16]; /* IPv4: the first 4 bytes, network order */
} REWIRE_WFP_ADDR;

/*
 * The records blob (mirrors struct rw_records, little-endian, version 1).
 * Treat it as opaque, as on Windows: pass the bytes from the query to the
 * SET call unchanged. The fields may be read for logging. The last 8 bytes
 * are a kernel-keyed SipHash tag, so a changed blob is refused (WSAEINVAL).
 */
typedef struct rewire_wfp_records {
	uint16_t magic;   /* 0x5752 */
	uint8_t version;  /* 1 */
	uint8_t n_chain;  /* services that handled the flow so far */
	uint8_t proto;    /* IPPROTO_TCP or IPPROTO_UDP */
	uint8_t _pad[3];
	uint64_t flow_id; /* random, the same at every hop */
	REWIRE_WFP_ADDR orig_dst; /* where the application connected */
	uint32_t pid;     /* the application */
	uint32_t uid;
	uint32_t gid;
	uint32_t _pad2;
	uint64_t cgroup_id;
	char comm[16];
	uint64_t created_ns; /* CLOCK_BOOTTIME of the first redirect */
	uint16_t chain[16];  /* service ids (1-based, config order), first to last */
	uint64_t tag;
} REWIRE_WFP_RECORDS;

/*
 * What SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT returns (mirrors struct
 * rw_context). `records` is the same blob the records query returns, so it
 * may be passed to the SET call directly.
 */
typedef struct rewire_wfp_context {
	uint16_t magic;      /* 0x5752 */
	uint8_t version;     /* 1 */
	uint8_t state;       /* REWIRE_WFP_* state of the calling service: REDIRECTED_BY_SELF */
	uint16_t service_id; /* service this hop was redirected to */
	uint16_t rule_id;    /* config rule (1-based) that matched */
	uint8_t hop;         /* 1 = the application's own connect */
	uint8_t _pad[7];
	uint64_t redirected_ns; /* CLOCK_BOOTTIME of this hop's redirect */
	REWIRE_WFP_RECORDS records;
} REWIRE_WFP_CONTEXT;

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(REWIRE_WFP_RECORDS) == REWIRE_WFP_MAX_RECORDS_SIZE, "records layout");
_Static_assert(sizeof(REWIRE_WFP_CONTEXT) == REWIRE_WFP_MAX_CONTEXT_SIZE, "context layout");
_Static_assert(sizeof(WSAOVERLAPPED) == 32, "WSAOVERLAPPED layout");
#endif

/* ---- Functions ---------------------------------------------------------- */

/*
 * WSAIoctl: one of the three WFP redirect control codes on socket s.
 *
 * QUERY_RECORDS / QUERY_CONTEXT (on the accepted socket): lpvInBuffer and
 *   cbInBuffer are ignored; the answer (128 / 152 bytes) is written to
 *   lpvOutBuffer, which must hold at least REWIRE_WFP_MAX_RECORDS_SIZE /
 *   REWIRE_WFP_MAX_CONTEXT_SIZE bytes (else WSAEINVAL, which also covers
 *   cbOutBuffer < sizeof(ULONG)).
 * SET_RECORDS (on a new, not yet connected TCP socket): lpvInBuffer /
 *   cbInBuffer hold the blob from the query; cbOutBuffer must be 0 (else
 *   WSAEINVAL); lpvOutBuffer is ignored. On success *lpcbBytesReturned is
 *   the number of input bytes taken (128).
 *
 * Returns 0 on success with *lpcbBytesReturned > 0. Otherwise returns
 * SOCKET_ERROR, sets WSAGetLastError() and leaves *lpcbBytesReturned = 0.
 * Checks, in order: lpcbBytesReturned writable if given (WSAEFAULT); s a
 * socket (WSAENOTSOCK); lpcbBytesReturned given unless overlapped
 * (WSAEFAULT); control code known (WSAEINVAL); buffers (NULL or invalid ->
 * WSAEFAULT; sizes -> WSAEINVAL); then the kernel decides: WSAEACCES
 * (caller not root or granted), WSAEOPNOTSUPP (Unix socket, or socket not
 * in a rewire cgroup), WSAEINVAL (not a redirected connection, not TCP,
 * already connected, blob altered/truncated/from another flow).
 *
 * Overlapped: if s is overlapped and lpOverlapped is not NULL, the buffers
 * and lpOverlapped/lpCompletionRoutine are checked at once, then the call
 * returns SOCKET_ERROR with WSA_IO_PENDING and *lpcbBytesReturned = 0. At
 * completion Internal/InternalHigh are set and, if lpCompletionRoutine is
 * NULL, lpOverlapped->hEvent (if not NULL; it is reset at the start) is
 * signalled; otherwise the routine is queued to the calling thread and runs
 * during its next alertable WSAWaitForMultipleEvents()/SleepEx(). The
 * buffers and *lpOverlapped must stay valid until then. On a non-overlapped
 * socket lpOverlapped and lpCompletionRoutine are ignored.
 */
int WSAAPI WSAIoctl(SOCKET s, DWORD dwIoControlCode, LPVOID lpvInBuffer, DWORD cbInBuffer, LPVOID lpvOutBuffer,
		    DWORD cbOutBuffer, LPDWORD lpcbBytesReturned, LPWSAOVERLAPPED lpOverlapped,
		    LPWSAOVERLAPPED_COMPLETION_ROUTINE lpCompletionRoutine);

/*
 * WSPIoctl: the service-provider form of WSAIoctl. Same behaviour; the
 * error code is also written to *lpErrno (and the thread's last error).
 * lpErrno must be writable (else SOCKET_ERROR with WSAGetLastError() ==
 * WSAEFAULT). lpThreadId, if not NULL, must be readable; completion routines
 * always run on the thread that made the call.
 */
int WSAAPI WSPIoctl(SOCKET s, DWORD dwIoControlCode, LPVOID lpvInBuffer, DWORD cbInBuffer, LPVOID lpvOutBuffer,
		    DWORD cbOutBuffer, LPDWORD lpcbBytesReturned, LPWSAOVERLAPPED lpOverlapped,
		    LPWSAOVERLAPPED_COMPLETION_ROUTINE lpCompletionRoutine, LPWSATHREADID lpThreadId, LPINT lpErrno);

/* The calling thread's last error code (per thread; not reset on success). */
int WSAAPI WSAGetLastError(void);
/* Sets the calling thread's last error code. */
void WSAAPI WSASetLastError(int iError);

/*
 * WSAGetOverlappedResult: outcome of an overlapped WSAIoctl. If it is still
 * pending: with fWait waits for it, else returns FALSE with
 * WSA_IO_INCOMPLETE. Once complete, sets *lpcbTransfer and *lpdwFlags (0)
 * and returns TRUE, or FALSE with the operation's error code (e.g.
 * WSA_OPERATION_ABORTED) in WSAGetLastError(). s is not checked (it may be
 * closed already). Invalid pointers: FALSE with WSAEFAULT.
 */
BOOL WSAAPI WSAGetOverlappedResult(SOCKET s, LPWSAOVERLAPPED lpOverlapped, LPDWORD lpcbTransfer, BOOL fWait,
				   LPDWORD lpdwFlags);

/* A new manual-reset event, not signalled. Never fails. */
WSAEVENT WSAAPI WSACreateEvent(void);
/* Frees an event. FALSE with WSA_INVALID_HANDLE for an unknown handle. */
BOOL WSAAPI WSACloseEvent(WSAEVENT hEvent);
/* Signals an event. FALSE with WSA_INVALID_HANDLE for an unknown handle. */
BOOL WSAAPI WSASetEvent(WSAEVENT hEvent);
/* Resets an event. FALSE with WSA_INVALID_HANDLE for an unknown handle. */
BOOL WSAAPI WSAResetEvent(WSAEVENT hEvent);

/*
 * WSAWaitForMultipleEvents: waits until one (fWaitAll FALSE: returns
 * WSA_WAIT_EVENT_0 + index of the first signalled) or all (returns
 * WSA_WAIT_EVENT_0) of the events are signalled, or dwTimeout ms pass
 * (WSA_WAIT_TIMEOUT; WSA_INFINITE waits forever). Events stay signalled
 * (manual reset). If fAlertable, completion routines queued for this thread
 * run on it and the wait returns WSA_WAIT_IO_COMPLETION. Failures return
 * WSA_WAIT_FAILED: WSA_INVALID_PARAMETER (cEvents 0 or > 64),
 * WSAEFAULT (lphEvents), WSA_INVALID_HANDLE.
 */
DWORD WSAAPI WSAWaitForMultipleEvents(DWORD cEvents, const WSAEVENT *lphEvents, BOOL fWaitAll, DWORD dwTimeout,
				      BOOL fAlertable);

/* SleepEx: sleeps dwMilliseconds (WSA_INFINITE: forever); if bAlertable, returns
 * WAIT_IO_COMPLETION as soon as this thread's completion routines have run. Else 0. */
DWORD WSAAPI SleepEx(DWORD dwMilliseconds, BOOL bAlertable);

/*
 * closesocket: cancels the socket's pending overlapped operations (they
 * complete with WSA_OPERATION_ABORTED: event signalled / routine queued),
 * waits for one already executing, forgets the overlapped mark, and closes
 * the descriptor. Returns 0, or SOCKET_ERROR with WSAENOTSOCK if s is not
 * a socket.
 */
int WSAAPI closesocket(SOCKET s);

/*
 * WSASocket: socket(af, type, protocol); with dwFlags = WSA_FLAG_OVERLAPPED
 * the socket is overlapped. lpProtocolInfo must be NULL and g 0 (else
 * WSAEINVAL). Returns INVALID_SOCKET on failure.
 */
SOCKET WSAAPI WSASocket(int af, int type, int protocol, void *lpProtocolInfo, unsigned int g, DWORD dwFlags);

/*
 * rewire_wsa_set_overlapped: marks (TRUE) or unmarks (FALSE) an existing
 * socket, e.g. one from accept(), as overlapped. Returns 0, or
 * SOCKET_ERROR with WSAENOTSOCK.
 */
int rewire_wsa_set_overlapped(SOCKET s, BOOL fOverlapped);

/*
 * rewire_wsa_set_completion_delay: overlapped operations queued from now on
 * start no earlier than dwMilliseconds after the call (default 0). For
 * tests and diagnosis: it opens a window in which closesocket() or
 * WSAGetOverlappedResult(fWait = FALSE) see the operation pending.
 */
void rewire_wsa_set_completion_delay(DWORD dwMilliseconds);

#ifdef __cplusplus
}
#endif

#endif /* REWIRE_WSA_H */
