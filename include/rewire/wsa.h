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
 * and, for UDP, WSARecvMsg / WSASendMsg (from SIO_GET_EXTENSION_FUNCTION_POINTER)
 * with the IP_WFP_REDIRECT_RECORDS / IP_WFP_REDIRECT_CONTEXT control messages.
 *
 * This header declares the same calls, types, control codes and error codes
 * for Linux, served by librewire_wsa (link with `-lrewire_wsa`, or
 * `pkg-config --libs rewire-wsa`). The sockets must be created inside a
 * rewire-managed cgroup (`rewire run` / `rewire exec`), where rewire's eBPF
 * hooks redirect connections and answer the queries.
 *
 * Differences from Windows, all deliberate:
 *  - SOCKET is a Linux file descriptor (int). Per-socket state (the
 *    overlapped attribute, pending operations) is bound to the socket itself
 *    (its kernel cookie), not to the number: after close() the number's next
 *    socket starts fresh, and an operation whose socket was closed (with
 *    close() or closesocket()) completes with WSA_OPERATION_ABORTED. It never
 *    runs on whatever file the number names later.
 *  - As on Windows, sockets from socket() and accept() are overlapped;
 *    WSASocket() without WSA_FLAG_OVERLAPPED makes a non-overlapped one.
 *    rewire_wsa_set_overlapped() changes one socket,
 *    rewire_wsa_set_default_overlapped(FALSE) makes unmarked sockets
 *    non-overlapped.
 *  - fork(): the parent's pending operations complete in the parent. The
 *    child inherits none: in the child's memory each is reported
 *    WSA_OPERATION_ABORTED (Internal set, event signalled; a completion
 *    routine only if the forking thread issued it). The child's own
 *    operations work as usual.
 *  - Thread exit: operations the thread issued that have not started are
 *    aborted (Internal = WSA_OPERATION_ABORTED, event signalled); its
 *    completion routines are dropped, and never run on another thread, even
 *    one that gets the same thread id.
 *  - A too-small output buffer fails with WSAEINVAL and *lpcbBytesReturned = 0
 *    (as the SET page of the specification says; the query pages' alternative
 *    ERROR_INSUFFICIENT_BUFFER is not used). Size buffers with
 *    REWIRE_WFP_MAX_RECORDS_SIZE / REWIRE_WFP_MAX_CONTEXT_SIZE.
 *  - WSAOVERLAPPED.Internal holds STATUS_PENDING while pending, then 0 or the
 *    WSA error code (Windows stores an NTSTATUS there).
 *  - WSAEINPROGRESS and WSAEINTR exist for source compatibility; the calls
 *    never block, so they are not returned in practice.
 *
 * Pointer arguments are copied by the kernel (read(2)/write(2) through a
 * private pipe), never dereferenced: a NULL pointer where data is
 * needed, or a range not wholly inside valid (readable; for outputs,
 * writable) memory, fails with WSAEFAULT instead of crashing.
 */
#ifndef REWIRE_WSA_H
#define REWIRE_WSA_H

#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

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

/* A socket as the HANDLE that CancelIo()/CancelIoEx() take ((HANDLE)s on Windows). */
#define REWIRE_SOCKET_HANDLE(s) ((HANDLE)(intptr_t)(s))

/* ---- Control codes ------------------------------------------------------ */

/*
 * Built as in winsock2.h. The Windows IOC_IN/IOC_OUT/IOC_VOID names are not
 * defined here: Linux's <sys/ioctl.h> defines them with other values.
 */
#define REWIRE_IOC_VOID 0x20000000u
#define REWIRE_IOC_OUT 0x40000000u
#define REWIRE_IOC_IN 0x80000000u
#define REWIRE_IOC_INOUT (REWIRE_IOC_IN | REWIRE_IOC_OUT)
#define IOC_UNIX 0x00000000u
#define IOC_WS2 0x08000000u
#define IOC_PROTOCOL 0x10000000u
#define IOC_VENDOR 0x18000000u
#define _WSAIO(x, y) ((DWORD)(REWIRE_IOC_VOID | (x) | (y)))
#define _WSAIOR(x, y) ((DWORD)(REWIRE_IOC_OUT | (x) | (y)))
#define _WSAIOW(x, y) ((DWORD)(REWIRE_IOC_IN | (x) | (y)))
#define _WSAIORW(x, y) ((DWORD)(REWIRE_IOC_INOUT | (x) | (y)))

/* Served (mstcpip.h: _WSAIOW(IOC_VENDOR, N)). */
#define SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS ((DWORD)0x980000DC) /* N = 220 */
#define SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT ((DWORD)0x980000DD) /* N = 221 */
#define SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS ((DWORD)0x980000DE)   /* N = 222 */
/* Served: aborts the socket's pending operations (0x28000004). */
#define SIO_FLUSH _WSAIO(IOC_WS2, 4)
/* Served: WSARecvMsg / WSASendMsg by GUID (0xC8000006), see below. */
#define SIO_GET_EXTENSION_FUNCTION_POINTER _WSAIORW(IOC_WS2, 6)

/*
 * Defined by Windows, not served: WSAIoctl answers WSAEOPNOTSUPP. Any other
 * value is no control code: WSAEINVAL. FIONBIO, FIONREAD, FIOASYNC and
 * SIOCATMARK are defined only if <sys/ioctl.h> has not defined them; their
 * Linux values get WSAEOPNOTSUPP too (use fcntl(O_NONBLOCK), ioctl(FIONREAD)).
 */
#ifndef FIONBIO
#define FIONBIO ((DWORD)0x8004667E)    /* _IOW('f', 126, u_long) */
#endif
#ifndef FIONREAD
#define FIONREAD ((DWORD)0x4004667F)   /* _IOR('f', 127, u_long) */
#endif
#ifndef FIOASYNC
#define FIOASYNC ((DWORD)0x8004667D)   /* _IOW('f', 125, u_long) */
#endif
#ifndef SIOCATMARK
#define SIOCATMARK ((DWORD)0x40047307) /* _IOR('s', 7, u_long) */
#endif
#define SIOCSHIWAT ((DWORD)0x80047300) /* _IOW('s', 0, u_long) */
#define SIOCGHIWAT ((DWORD)0x40047301) /* _IOR('s', 1, u_long) */
#define SIOCSLOWAT ((DWORD)0x80047302) /* _IOW('s', 2, u_long) */
#define SIOCGLOWAT ((DWORD)0x40047303) /* _IOR('s', 3, u_long) */
#define SIO_ASSOCIATE_HANDLE _WSAIOW(IOC_WS2, 1)
#define SIO_ENABLE_CIRCULAR_QUEUEING _WSAIO(IOC_WS2, 2)
#define SIO_FIND_ROUTE _WSAIOR(IOC_WS2, 3)
#define SIO_GET_BROADCAST_ADDRESS _WSAIOR(IOC_WS2, 5)
#define SIO_GET_QOS _WSAIORW(IOC_WS2, 7)
#define SIO_GET_GROUP_QOS _WSAIORW(IOC_WS2, 8)
#define SIO_MULTIPOINT_LOOPBACK _WSAIOW(IOC_WS2, 9)
#define SIO_MULTICAST_SCOPE _WSAIOW(IOC_WS2, 10)
#define SIO_SET_QOS _WSAIOW(IOC_WS2, 11)
#define SIO_SET_GROUP_QOS _WSAIOW(IOC_WS2, 12)
#define SIO_TRANSLATE_HANDLE _WSAIORW(IOC_WS2, 13)
#define SIO_ROUTING_INTERFACE_QUERY _WSAIORW(IOC_WS2, 20)
#define SIO_ROUTING_INTERFACE_CHANGE _WSAIOW(IOC_WS2, 21)
#define SIO_ADDRESS_LIST_QUERY _WSAIOR(IOC_WS2, 22)
#define SIO_ADDRESS_LIST_CHANGE _WSAIO(IOC_WS2, 23)
#define SIO_QUERY_TARGET_PNP_HANDLE _WSAIOR(IOC_WS2, 24)
#define SIO_ADDRESS_LIST_SORT _WSAIORW(IOC_WS2, 25)
#define SIO_BSP_HANDLE _WSAIOR(IOC_WS2, 27)
#define SIO_BSP_HANDLE_SELECT _WSAIOR(IOC_WS2, 28)
#define SIO_BSP_HANDLE_POLL _WSAIOR(IOC_WS2, 29)
#define SIO_EXT_SELECT _WSAIORW(IOC_WS2, 30)
#define SIO_EXT_POLL _WSAIORW(IOC_WS2, 31)
#define SIO_EXT_SENDMSG _WSAIORW(IOC_WS2, 32)
#define SIO_BASE_HANDLE _WSAIOR(IOC_WS2, 34)
#define SIO_QUERY_RSS_PROCESSOR_INFO _WSAIOR(IOC_WS2, 37)
#define SIO_GET_INTERFACE_LIST ((DWORD)0x4004747F)    /* _IOR('t', 127, u_long) */
#define SIO_GET_INTERFACE_LIST_EX ((DWORD)0x4004747E) /* _IOR('t', 126, u_long) */
#define SIO_SET_MULTICAST_FILTER ((DWORD)0x8004747D)  /* _IOW('t', 125, u_long) */
#define SIO_IDEAL_SEND_BACKLOG_QUERY ((DWORD)0x4004747B) /* _IOR('t', 123, u_long) */
#define SIO_IDEAL_SEND_BACKLOG_CHANGE ((DWORD)0x2000747A) /* _IO('t', 122) */
#define SIO_RCVALL _WSAIOW(IOC_VENDOR, 1)
#define SIO_RCVALL_MCAST _WSAIOW(IOC_VENDOR, 2)
#define SIO_RCVALL_IGMPMCAST _WSAIOW(IOC_VENDOR, 3)
#define SIO_KEEPALIVE_VALS _WSAIOW(IOC_VENDOR, 4) /* 0x98000004 */
#define SIO_ABSORB_RTRALERT _WSAIOW(IOC_VENDOR, 5)
#define SIO_UCAST_IF _WSAIOW(IOC_VENDOR, 6)
#define SIO_LIMIT_BROADCASTS _WSAIOW(IOC_VENDOR, 7)
#define SIO_INDEX_BIND _WSAIOW(IOC_VENDOR, 8)
#define SIO_INDEX_MCASTIF _WSAIOW(IOC_VENDOR, 9)
#define SIO_INDEX_ADD_MCAST _WSAIOW(IOC_VENDOR, 10)
#define SIO_INDEX_DEL_MCAST _WSAIOW(IOC_VENDOR, 11)
#define SIO_RCVALL_MCAST_IF _WSAIOW(IOC_VENDOR, 13)
#define SIO_RCVALL_IF _WSAIOW(IOC_VENDOR, 14)
#define SIO_LOOPBACK_FAST_PATH _WSAIOW(IOC_VENDOR, 16)
#define SIO_TCP_INITIAL_RTO _WSAIOW(IOC_VENDOR, 17)
#define SIO_APPLY_TRANSPORT_SETTING _WSAIOW(IOC_VENDOR, 19)
#define SIO_QUERY_TRANSPORT_SETTING _WSAIOW(IOC_VENDOR, 20)
#define SIO_CPU_AFFINITY _WSAIOW(IOC_VENDOR, 21)
#define SIO_TCP_SET_ICW _WSAIOW(IOC_VENDOR, 22)
#define SIO_TCP_SET_ACK_FREQUENCY _WSAIOW(IOC_VENDOR, 23)
#define SIO_SET_PRIORITY_HINT _WSAIOW(IOC_VENDOR, 24)
#define SIO_TCP_INFO _WSAIORW(IOC_VENDOR, 39)
#define SIO_ACQUIRE_PORT_RESERVATION _WSAIOW(IOC_VENDOR, 100)
#define SIO_RELEASE_PORT_RESERVATION _WSAIOW(IOC_VENDOR, 101)
#define SIO_ASSOCIATE_PORT_RESERVATION _WSAIOW(IOC_VENDOR, 102)
#define SIO_SET_SECURITY _WSAIOW(IOC_VENDOR, 200)
#define SIO_QUERY_SECURITY _WSAIORW(IOC_VENDOR, 201)
#define SIO_SET_PEER_TARGET_NAME _WSAIOW(IOC_VENDOR, 202)
#define SIO_DELETE_PEER_TARGET_NAME _WSAIOW(IOC_VENDOR, 203)
#define SIO_SOCKET_USAGE_NOTIFICATION _WSAIOW(IOC_VENDOR, 204)
#define SIO_QUERY_WFP_ALE_ENDPOINT_HANDLE _WSAIOR(IOC_VENDOR, 205)
#define SIO_QUERY_RSS_SCALABILITY_INFO _WSAIOR(IOC_VENDOR, 210)
#define SIO_TIMESTAMPING _WSAIOW(IOC_VENDOR, 235)

/* ---- Error codes -------------------------------------------------------- */

#define WSA_INVALID_HANDLE 6        /* not an event handle of this library */
#ifndef ERROR_INVALID_HANDLE
#define ERROR_INVALID_HANDLE 6      /* CancelIo/CancelIoEx: the handle is not a socket */
#endif
#ifndef ERROR_NOT_FOUND
#define ERROR_NOT_FOUND 1168        /* CancelIo/CancelIoEx: nothing pending to cancel */
#endif
#define WSA_INVALID_PARAMETER 87    /* e.g. event count 0 or > WSA_MAXIMUM_WAIT_EVENTS */
#define WSA_OPERATION_ABORTED 995   /* cancelled: socket closed, SIO_FLUSH, CancelIo(Ex), issuing thread exited */
#define WSA_IO_INCOMPLETE 996       /* WSAGetOverlappedResult(fWait = FALSE) on a pending operation */
#define WSA_IO_PENDING 997          /* overlapped operation started; completes later */
#define WSAEINTR 10004
#define WSAEACCES 10013             /* caller is neither root nor granted in the config's [access] */
#define WSAEFAULT 10014             /* a pointer argument is NULL or not wholly in valid memory */
#define WSAEINVAL 10022             /* no control code, bad input, wrong socket type/state, buffer too small */
#define WSAEWOULDBLOCK 10035         /* WSARecvMsg on a non-blocking socket: no datagram queued */
#define WSAEINPROGRESS 10036
#define WSAENOTSOCK 10038           /* s is not a (open) socket */
#define WSAEMSGSIZE 10040           /* WSARecvMsg: the datagram was larger than the buffers (rest discarded) */
#define WSAEOPNOTSUPP 10045         /* a Windows control code rewire does not serve; transport cannot carry
                                       records (Unix socket); or no rewire hooks serve s */
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

/*
 * Context layouts. Each service's comes from its `context` in the config
 * (context = "rewire" | "sockaddrs" | { hex = ".." } | { base64 = ".." });
 * a process may override it for all its sockets with
 * rewire_wsa_set_context_layout():
 * SERVICE: the layout the config gives the service the flow was redirected
 *   to (the default; rewire's struct if the config says nothing). The library
 *   reads the layouts rewire published for the configuration the kernel
 *   runs (the file `rewire run`/`rewire exec` name in $REWIRE_LAYOUTS, again
 *   when it is replaced; not the config file) and looks the service up by
 *   the id the kernel wrote in the flow's context (not found: WSAEINVAL). Vendor bytes: the answer is exactly the
 *   configured bytes (1 to REWIRE_WFP_MAX_VENDOR_CONTEXT_SIZE), the same for
 *   every flow of the service, and only for a flow rewire redirected;
 *   cbOutBuffer must hold them (else WSAEINVAL).
 * REWIRE: a REWIRE_WFP_CONTEXT (152 bytes).
 * SOCKADDRS: the layout of Microsoft's sample callout and of ports written
 *   for it, two SOCKADDR_STORAGE (256 bytes): [0] the original remote
 *   address (where the application connected), [1] the original local
 *   address: the application's socket as the service sees it (the accepted
 *   socket's peer). Its port is the application's; its address is the one
 *   the redirected connect used (loopback for a local service), not the
 *   interface address a direct connection would have had.
 */
#define REWIRE_WFP_CONTEXT_LAYOUT_REWIRE 0
#define REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS 1
#define REWIRE_WFP_CONTEXT_LAYOUT_SERVICE 2
#define REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE 256
#define REWIRE_WFP_MAX_VENDOR_CONTEXT_SIZE 1024

/* Redirect states (FWP_CONNECTION_REDIRECT_STATE). */
#define REWIRE_WFP_NOT_REDIRECTED 0
#define REWIRE_WFP_REDIRECTED_BY_SELF 1
#define REWIRE_WFP_REDIRECTED_BY_OTHER 2
#define REWIRE_WFP_PREVIOUSLY_REDIRECTED_BY_SELF 3

/* An address as the kernel hooks store it (mirrors struct rw_addr; checked by tests/c/abi_same.c). */
typedef struct rewire_wfp_addr {
	uint8_t family;   /* AF_INET or AF_INET6 */
	uint8_t _pad;
	uint16_t port_be; /* network byte order, like sin_port */
	uint32_t scope_id; /* IPv6 link-local: the interface the application named, else 0 */
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
	uint8_t depth;    /* hops of the flows this one was started for (counted by the hop limit) */
	uint8_t _pad[2];
	uint64_t flow_id; /* random, the same at every hop */
	REWIRE_WFP_ADDR orig_dst; /* where the application connected */
	uint32_t pid;     /* the application */
	uint32_t uid;
	uint32_t gid;
	uint32_t origin_sel; /* origin selectors (cgroup path, executable) the origin matched */
	uint64_t cgroup_id;
	char comm[16];
	uint64_t created_ns; /* CLOCK_BOOTTIME of the first redirect */
	uint16_t chain[16];  /* service ids (1-based), first to last */
	uint64_t mac;        /* kernel-keyed SipHash-2-4 of the bytes above */
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

/* ---- UDP: WSARecvMsg / WSASendMsg and the WFP control messages ----------- */

/* ws2ipdef.h: at level IPPROTO_IP (IPv4 flows) and IPPROTO_IPV6 (IPv6 flows). */
#define IP_WFP_REDIRECT_RECORDS 60
#define IP_WFP_REDIRECT_CONTEXT 70
#define IPV6_WFP_REDIRECT_RECORDS 60
#define IPV6_WFP_REDIRECT_CONTEXT 70

#ifndef GUID_DEFINED
#define GUID_DEFINED
typedef struct _GUID {
	uint32_t Data1;
	uint16_t Data2;
	uint16_t Data3;
	uint8_t Data4[8];
} GUID;
#endif

/* mswsock.h */
#define WSAID_WSARECVMSG { 0xf689d7c8, 0x6f1f, 0x436b, { 0x8a, 0x53, 0xe5, 0x4f, 0xe3, 0x51, 0xc3, 0x22 } }
#define WSAID_WSASENDMSG { 0xa441e712, 0x754f, 0x43ca, { 0x84, 0xa7, 0x0d, 0xee, 0x44, 0xcf, 0x60, 0x6d } }
/* Defined by Windows, not served: SIO_GET_EXTENSION_FUNCTION_POINTER answers WSAEOPNOTSUPP. */
#define WSAID_ACCEPTEX { 0xb5367df1, 0xcbac, 0x11cf, { 0x95, 0xca, 0x00, 0x80, 0x5f, 0x48, 0xa1, 0x92 } }
#define WSAID_CONNECTEX { 0x25a207b9, 0xddf3, 0x4660, { 0x8e, 0xe9, 0x76, 0xe5, 0x8c, 0x74, 0x06, 0x3e } }
#define WSAID_DISCONNECTEX { 0x7fda2e11, 0x8630, 0x436f, { 0xa0, 0x31, 0xf5, 0x36, 0xa6, 0xee, 0xc1, 0x57 } }
#define WSAID_GETACCEPTEXSOCKADDRS { 0xb5367df2, 0xcbac, 0x11cf, { 0x95, 0xca, 0x00, 0x80, 0x5f, 0x48, 0xa1, 0x92 } }
#define WSAID_TRANSMITFILE { 0xb5367df0, 0xcbac, 0x11cf, { 0x95, 0xca, 0x00, 0x80, 0x5f, 0x48, 0xa1, 0x92 } }
#define WSAID_TRANSMITPACKETS { 0xd9689da0, 0x1f90, 0x11d3, { 0x99, 0x71, 0x00, 0xc0, 0x4f, 0x68, 0xc8, 0x76 } }

typedef struct _WSABUF {
	ULONG len;
	char *buf;
} WSABUF, *LPWSABUF;

typedef struct _WSAMSG {
	struct sockaddr *name; /* source (receive) / destination (send); may be NULL */
	INT namelen;
	LPWSABUF lpBuffers;
	ULONG dwBufferCount;
	WSABUF Control;        /* control messages */
	ULONG dwFlags;         /* receive: out MSG_TRUNC / MSG_CTRUNC (the Linux values of <sys/socket.h>) */
} WSAMSG, *LPWSAMSG;

typedef struct _WSACMSGHDR {
	size_t cmsg_len; /* header and data */
	INT cmsg_level;
	INT cmsg_type;
} WSACMSGHDR, *LPWSACMSGHDR;

/* As in ws2def.h. */
#define WSA_CMSGHDR_ALIGN(length) (((length) + sizeof(size_t) - 1) & ~(sizeof(size_t) - 1))
#define WSA_CMSGDATA_ALIGN(length) (((length) + sizeof(void *) - 1) & ~(sizeof(void *) - 1))
#define WSA_CMSG_FIRSTHDR(msg) (((msg)->Control.len >= sizeof(WSACMSGHDR)) ? (LPWSACMSGHDR)(msg)->Control.buf : (LPWSACMSGHDR)NULL)
#define WSA_CMSG_NXTHDR(msg, cmsg)                                                                              \
	(((cmsg) == NULL) ? WSA_CMSG_FIRSTHDR(msg)                                                                \
	 : (((unsigned char *)(cmsg) + WSA_CMSGHDR_ALIGN((cmsg)->cmsg_len) + sizeof(WSACMSGHDR) >               \
	     (unsigned char *)((msg)->Control.buf) + (msg)->Control.len)                                        \
		    ? (LPWSACMSGHDR)NULL                                                                      \
		    : (LPWSACMSGHDR)((unsigned char *)(cmsg) + WSA_CMSGHDR_ALIGN((cmsg)->cmsg_len))))
#define WSA_CMSG_DATA(cmsg) ((unsigned char *)(cmsg) + WSA_CMSGDATA_ALIGN(sizeof(WSACMSGHDR)))
#define WSA_CMSG_SPACE(length) (WSA_CMSGDATA_ALIGN(sizeof(WSACMSGHDR) + WSA_CMSGHDR_ALIGN(length)))
#define WSA_CMSG_LEN(length) (WSA_CMSGDATA_ALIGN(sizeof(WSACMSGHDR)) + (length))

typedef INT(WSAAPI *LPFN_WSARECVMSG)(SOCKET s, LPWSAMSG lpMsg, LPDWORD lpdwNumberOfBytesRecvd, LPWSAOVERLAPPED lpOverlapped,
				      LPWSAOVERLAPPED_COMPLETION_ROUTINE lpCompletionRoutine);
typedef INT(WSAAPI *LPFN_WSASENDMSG)(SOCKET s, LPWSAMSG lpMsg, DWORD dwFlags, LPDWORD lpNumberOfBytesSent,
				      LPWSAOVERLAPPED lpOverlapped, LPWSAOVERLAPPED_COMPLETION_ROUTINE lpCompletionRoutine);

/* ---- Functions ---------------------------------------------------------- */

/*
 * WSAIoctl: one of the three WFP redirect control codes, SIO_FLUSH or
 * SIO_GET_EXTENSION_FUNCTION_POINTER (with UDP below), on socket s.
 *
 * QUERY_RECORDS / QUERY_CONTEXT (on the accepted TCP socket, or a UDP flow
 *   socket: bound to the service address and connected to the datagram's
 *   source): lpvInBuffer and cbInBuffer are ignored; the answer (128 / 152
 *   bytes; the context 256 in the SOCKADDRS layout, the configured bytes in
 *   a vendor layout) is written to lpvOutBuffer, which must hold at least
 *   REWIRE_WFP_MAX_RECORDS_SIZE / REWIRE_WFP_MAX_CONTEXT_SIZE
 *   (REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE, the vendor bytes' length) bytes (else
 *   WSAEINVAL, which also covers cbOutBuffer < sizeof(ULONG)).
 * SET_RECORDS (on a new TCP or UDP socket, before connect()/sendto()):
 *   lpvInBuffer / cbInBuffer hold the blob from the query; cbOutBuffer must
 *   be 0 (else WSAEINVAL); lpvOutBuffer is ignored. On success
 *   *lpcbBytesReturned is the number of input bytes taken (128).
 * SIO_FLUSH: buffers ignored. Cancels the socket's pending overlapped
 *   operations that have not started (each completes with
 *   WSA_OPERATION_ABORTED; one already executing completes normally); the
 *   socket stays usable. Returns 0 with *lpcbBytesReturned = 0, at once
 *   even when overlapped (the completion is then also reported through
 *   lpOverlapped: Internal 0, event signalled or routine queued).
 *
 * Returns 0 on success with *lpcbBytesReturned > 0 (SIO_FLUSH: 0). Otherwise
 * returns SOCKET_ERROR, sets WSAGetLastError() and leaves
 * *lpcbBytesReturned = 0. Checks, in order: lpcbBytesReturned writable if
 * given (WSAEFAULT); s a socket (WSAENOTSOCK); lpcbBytesReturned given unless
 * the call is overlapped (WSAEFAULT); the control code (WSAEOPNOTSUPP for a
 * Windows code rewire does not serve, listed above; WSAEINVAL for a value
 * that is no code); buffers (NULL or invalid -> WSAEFAULT; sizes ->
 * WSAEINVAL; SET: a blob that is not a records blob -- wrong length
 * (cbInBuffer must be 128), magic, version, chain or address family -> WSAEINVAL,
 * on any socket, before the kernel is asked); the socket type (an IP socket
 * that is not TCP or UDP, e.g. raw, or a listening socket -> WSAEINVAL); for
 * an overlapped call lpOverlapped/lpCompletionRoutine (WSAEFAULT) and hEvent
 * (WSA_INVALID_HANDLE); then the kernel decides: WSAEACCES (caller not root
 * or granted), WSAEOPNOTSUPP (Unix socket, or socket not in a rewire
 * cgroup), WSAEINVAL (not a redirected connection, a UDP socket not
 * connected to its flow, SET after connect(), blob altered or from another
 * flow: the kernel checks its keyed tag).
 *
 * Overlapped: if s is overlapped (the default, see above) and lpOverlapped
 * is not NULL, the arguments are checked at once, then the call returns
 * SOCKET_ERROR with WSA_IO_PENDING and *lpcbBytesReturned = 0. At
 * completion Internal/InternalHigh are set and, if lpCompletionRoutine is
 * NULL, lpOverlapped->hEvent (if not NULL; it is reset at the start) is
 * signalled; otherwise the routine is queued to the calling thread and runs
 * during its next alertable WSAWaitForMultipleEvents()/SleepEx(). The
 * buffers and *lpOverlapped must stay valid until then. The operation runs
 * on the socket s named when it was issued, never on another: if s is
 * closed first, it completes with WSA_OPERATION_ABORTED. On a
 * non-overlapped socket lpOverlapped and lpCompletionRoutine are ignored
 * (the routine is never queued).
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
 * waits for one already executing, forgets the overlapped attribute, and
 * closes the descriptor. Returns 0, or SOCKET_ERROR with WSAENOTSOCK if s
 * is not a socket. A plain close() also works: operations of a closed
 * socket are aborted when their turn comes (within about 100 ms).
 */
int WSAAPI closesocket(SOCKET s);

/*
 * CancelIoEx: cancels the pending overlapped operation of socket
 * REWIRE_SOCKET_HANDLE(s) issued with lpOverlapped, or every pending one of
 * the socket if lpOverlapped is NULL, whichever thread issued it. CancelIo:
 * those the calling thread issued. Cancelled operations complete with
 * WSA_OPERATION_ABORTED (event signalled / routine queued) before the call
 * returns; one already executing completes normally. Returns TRUE if any
 * was found; FALSE with WSAGetLastError() == ERROR_NOT_FOUND if none, or
 * ERROR_INVALID_HANDLE if the handle is not a socket. The usual pattern for
 * a timed query: WSAWaitForMultipleEvents(..., timeout) == WSA_WAIT_TIMEOUT
 * -> CancelIoEx(h, &ov) -> WSAGetOverlappedResult(s, &ov, ..., TRUE, ...).
 */
BOOL WSAAPI CancelIoEx(HANDLE hFile, LPWSAOVERLAPPED lpOverlapped);
BOOL WSAAPI CancelIo(HANDLE hFile);

/*
 * WSASocket: socket(af, type, protocol); overlapped if dwFlags has
 * WSA_FLAG_OVERLAPPED, else non-overlapped (lpOverlapped then ignored).
 * lpProtocolInfo must be NULL and g 0 (else WSAEINVAL). Returns
 * INVALID_SOCKET on failure.
 */
SOCKET WSAAPI WSASocket(int af, int type, int protocol, void *lpProtocolInfo, unsigned int g, DWORD dwFlags);

/*
 * rewire_wsa_set_overlapped: makes an existing socket overlapped (TRUE) or
 * non-overlapped (FALSE), e.g. one from accept(). Bound to the socket: a
 * later socket with the same number does not inherit it. Returns 0, or
 * SOCKET_ERROR with WSAENOTSOCK.
 */
int rewire_wsa_set_overlapped(SOCKET s, BOOL fOverlapped);

/*
 * rewire_wsa_set_default_overlapped: whether sockets that neither WSASocket()
 * nor rewire_wsa_set_overlapped() marked (those from socket(), accept()) are
 * overlapped. TRUE by default, as on Windows, so a port that waits for the
 * completion of an overlapped call never hangs. Returns the previous setting.
 */
BOOL rewire_wsa_set_default_overlapped(BOOL fOverlapped);

/*
 * rewire_wsa_set_context_layout: the layout SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT
 * (and WSARecvMsg's IP_WFP_REDIRECT_CONTEXT) answers in, for every socket of
 * this process, from the next call on: REWIRE_WFP_CONTEXT_LAYOUT_SERVICE
 * (each service's as configured, the default), _REWIRE or _SOCKADDRS (see
 * above; with SOCKADDRS the output buffer must hold
 * REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE bytes, else WSAEINVAL). Returns the
 * previous choice, or SOCKET_ERROR with WSAEINVAL for an unknown one.
 */
int rewire_wsa_set_context_layout(int layout);

/*
 * rewire_wsa_set_completion_delay: overlapped operations queued from now on
 * start no earlier than dwMilliseconds after the call (default 0). For
 * tests and diagnosis: it opens a window in which closesocket() or
 * WSAGetOverlappedResult(fWait = FALSE) see the operation pending.
 */
void rewire_wsa_set_completion_delay(DWORD dwMilliseconds);

/*
 * UDP redirect services, the Windows way. Get the functions with
 * WSAIoctl(s, SIO_GET_EXTENSION_FUNCTION_POINTER, &guid, sizeof(GUID), &fn,
 * sizeof(fn), &bytes, NULL, NULL) and WSAID_WSARECVMSG / WSAID_WSASENDMSG
 * (an output smaller than a pointer or a NULL buffer: WSAEFAULT; cbInBuffer
 * not sizeof(GUID): WSAEINVAL; another Windows extension GUID, listed above:
 * WSAEOPNOTSUPP; any other GUID: WSAEINVAL). Then:
 *
 * rewire_wsa_setsockopt(l, IPPROTO_IP, IP_WFP_REDIRECT_RECORDS / _CONTEXT, &(DWORD){TRUE}, sizeof(DWORD))
 *   on the service's UDP socket l (IPPROTO_IPV6 / IPV6_WFP_* for an IPv6
 *   one), before bind(): WSARecvMsg then adds that control message. It also
 *   sets SO_REUSEPORT on l, which the flow sockets below need. Other options
 *   are passed to setsockopt(2). (Linux's setsockopt() does not know the two
 *   options: call this one, or #define setsockopt rewire_wsa_setsockopt.)
 *
 * WSARecvMsg(l, &msg, &n, ...) on l: one datagram, its source in msg.name,
 *   and for a flow rewire redirected, control messages at level IPPROTO_IP
 *   (IPPROTO_IPV6 for an IPv6 source): IP_WFP_REDIRECT_RECORDS (the records
 *   blob, REWIRE_WFP_MAX_RECORDS_SIZE bytes) then IP_WFP_REDIRECT_CONTEXT (the
 *   context in the process's layout), each only if enabled. Walk them with
 *   WSA_CMSG_FIRSTHDR/NXTHDR; size Control with WSA_CMSG_SPACE(). How it
 *   works: rewire answers a UDP flow on a socket bound to l's address and
 *   connected to the source, which then receives the flow's datagrams; the
 *   library makes that socket at a source's first datagram and WSARecvMsg
 *   waits on l and those sockets together. A control buffer too small for a
 *   message: the messages that fit, dwFlags |= MSG_CTRUNC, Control.len = the
 *   bytes written. A datagram larger than the buffers: the part that fits,
 *   dwFlags |= MSG_TRUNC, SOCKET_ERROR with WSAEMSGSIZE. msg.name too small:
 *   WSAEFAULT. Input dwFlags other than 0 (MSG_PEEK ...): WSAEOPNOTSUPP. A
 *   non-blocking l without a datagram: WSAEWOULDBLOCK. A connected UDP
 *   socket (an onward one) receives its own datagrams, without control data.
 *   Not a UDP socket: WSAEOPNOTSUPP. Flow sockets are closed once rewire says
 *   the application's socket closed, or after 60 s without a datagram.
 *   poll()/select() on l do not see datagrams queued on its flow sockets:
 *   wait in WSARecvMsg (a thread), as a blocking Windows receive loop does.
 *
 * WSASendMsg(l, &msg, 0, &n, ...) with msg.name a flow's source: the reply,
 *   sent through the flow's socket (the only one rewire lets answer the
 *   flow; the application sees it come from its original destination).
 *
 * WSASendMsg(o, &msg, 0, &n, ...) on a new UDP socket o with an
 *   IP_WFP_REDIRECT_RECORDS (IPV6_WFP_REDIRECT_RECORDS) control message
 *   holding the records from WSARecvMsg and msg.name the original
 *   destination: the records are set on o, o is connected there (rewire
 *   sends it to the next service or the destination), and the datagram
 *   sent. Later datagrams of the flow on o carry the same records (another
 *   blob on o: WSAEINVAL, one flow per socket); replies arrive on o. A
 *   malformed blob: WSAEINVAL; another control message: WSAEOPNOTSUPP;
 *   dwFlags other than 0: WSAEOPNOTSUPP.
 *
 * Both run synchronously (blocking, as with lpOverlapped NULL); given an
 * lpOverlapped on an overlapped socket, the completion is also reported
 * through it (Internal 0, event signalled or routine queued), as Windows
 * does for an overlapped call that completed at once.
 */
int WSAAPI rewire_wsa_recvmsg(SOCKET s, LPWSAMSG lpMsg, LPDWORD lpdwNumberOfBytesRecvd, LPWSAOVERLAPPED lpOverlapped,
			      LPWSAOVERLAPPED_COMPLETION_ROUTINE lpCompletionRoutine);
int WSAAPI WSASendMsg(SOCKET Handle, LPWSAMSG lpMsg, DWORD dwFlags, LPDWORD lpNumberOfBytesSent, LPWSAOVERLAPPED lpOverlapped,
		      LPWSAOVERLAPPED_COMPLETION_ROUTINE lpCompletionRoutine);
int rewire_wsa_setsockopt(SOCKET s, int level, int optname, const void *optval, int optlen);

#ifdef __cplusplus
}
#endif

#endif /* REWIRE_WSA_H */
