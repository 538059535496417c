//! Control codes and result codes, with the values of the Windows headers.
//!
//! A port passes the numbers of winsock2.h / mstcpip.h unchanged, so the
//! dispatch must tell the three served codes and `SIO_FLUSH` from every other
//! code Windows defines (`WSAEOPNOTSUPP`) and from values that are no code at
//! all (`WSAEINVAL`); the list lives here, beside the constants `wsa.h` mirrors.

use super::*;

/// `_WSAIOW(IOC_VENDOR, 220)`.
pub const SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS: DWORD = 0x9800_00DC;
/// `_WSAIOW(IOC_VENDOR, 221)`.
pub const SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT: DWORD = 0x9800_00DD;
/// `_WSAIOW(IOC_VENDOR, 222)`.
pub const SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS: DWORD = 0x9800_00DE;

/// `_WSAIORW(IOC_WS2, 6)`: the address of a Winsock extension function, by GUID (`WSARecvMsg`, `WSASendMsg`).
pub const SIO_GET_EXTENSION_FUNCTION_POINTER: DWORD = wsaiorw(IOC_WS2, 6);

/// `_WSAIO(IOC_WS2, 4)`: cancel the socket's pending overlapped operations.
pub const SIO_FLUSH: DWORD = 0x2800_0004;

pub(crate) const IOC_VOID: DWORD = 0x2000_0000;
pub(crate) const IOC_OUT: DWORD = 0x4000_0000;
pub(crate) const IOC_IN: DWORD = 0x8000_0000;
pub(crate) const IOC_INOUT: DWORD = IOC_IN | IOC_OUT;
pub(crate) const IOC_WS2: DWORD = 0x0800_0000;
pub(crate) const IOC_VENDOR: DWORD = 0x1800_0000;
pub(crate) const fn wsaio(x: DWORD, y: DWORD) -> DWORD {
    IOC_VOID | x | y
}
pub(crate) const fn wsaior(x: DWORD, y: DWORD) -> DWORD {
    IOC_OUT | x | y
}
pub(crate) const fn wsaiow(x: DWORD, y: DWORD) -> DWORD {
    IOC_IN | x | y
}
pub(crate) const fn wsaiorw(x: DWORD, y: DWORD) -> DWORD {
    IOC_INOUT | x | y
}

/// Control codes the Windows headers (winsock2.h, ws2def.h, ws2ipdef.h,
/// mstcpip.h) define and rewire does not serve: `WSAEOPNOTSUPP`, where a
/// value that is no control code at all gets `WSAEINVAL`. Kept in step with
/// `wsa.h` by the conformance suite, which calls each of its macros.
pub const UNSERVED_CODES: &[(&str, DWORD)] = &[
    ("FIONBIO", 0x8004_667E),
    ("FIONREAD", 0x4004_667F),
    ("FIOASYNC", 0x8004_667D),
    ("SIOCSHIWAT", 0x8004_7300),
    ("SIOCGHIWAT", 0x4004_7301),
    ("SIOCSLOWAT", 0x8004_7302),
    ("SIOCGLOWAT", 0x4004_7303),
    ("SIOCATMARK", 0x4004_7307),
    // The same four under their Linux <sys/ioctl.h> values, which a port
    // that includes that header passes.
    ("FIONBIO (Linux value)", 0x5421),
    ("FIONREAD (Linux value)", 0x541B),
    ("FIOASYNC (Linux value)", 0x5452),
    ("SIOCATMARK (Linux value)", 0x8905),
    ("SIO_ASSOCIATE_HANDLE", wsaiow(IOC_WS2, 1)),
    ("SIO_ENABLE_CIRCULAR_QUEUEING", wsaio(IOC_WS2, 2)),
    ("SIO_FIND_ROUTE", wsaior(IOC_WS2, 3)),
    ("SIO_GET_BROADCAST_ADDRESS", wsaior(IOC_WS2, 5)),
    ("SIO_GET_QOS", wsaiorw(IOC_WS2, 7)),
    ("SIO_GET_GROUP_QOS", wsaiorw(IOC_WS2, 8)),
    ("SIO_MULTIPOINT_LOOPBACK", wsaiow(IOC_WS2, 9)),
    ("SIO_MULTICAST_SCOPE", wsaiow(IOC_WS2, 10)),
    ("SIO_SET_QOS", wsaiow(IOC_WS2, 11)),
    ("SIO_SET_GROUP_QOS", wsaiow(IOC_WS2, 12)),
    ("SIO_TRANSLATE_HANDLE", wsaiorw(IOC_WS2, 13)),
    ("SIO_ROUTING_INTERFACE_QUERY", wsaiorw(IOC_WS2, 20)),
    ("SIO_ROUTING_INTERFACE_CHANGE", wsaiow(IOC_WS2, 21)),
    ("SIO_ADDRESS_LIST_QUERY", wsaior(IOC_WS2, 22)),
    ("SIO_ADDRESS_LIST_CHANGE", wsaio(IOC_WS2, 23)),
    ("SIO_QUERY_TARGET_PNP_HANDLE", wsaior(IOC_WS2, 24)),
    ("SIO_ADDRESS_LIST_SORT", wsaiorw(IOC_WS2, 25)),
    ("SIO_BSP_HANDLE", wsaior(IOC_WS2, 27)),
    ("SIO_BSP_HANDLE_SELECT", wsaior(IOC_WS2, 28)),
    ("SIO_BSP_HANDLE_POLL", wsaior(IOC_WS2, 29)),
    ("SIO_EXT_SELECT", wsaiorw(IOC_WS2, 30)),
    ("SIO_EXT_POLL", wsaiorw(IOC_WS2, 31)),
    ("SIO_EXT_SENDMSG", wsaiorw(IOC_WS2, 32)),
    ("SIO_BASE_HANDLE", wsaior(IOC_WS2, 34)),
    ("SIO_QUERY_RSS_PROCESSOR_INFO", wsaior(IOC_WS2, 37)),
    ("SIO_GET_INTERFACE_LIST", 0x4004_747F),
    ("SIO_GET_INTERFACE_LIST_EX", 0x4004_747E),
    ("SIO_SET_MULTICAST_FILTER", 0x8004_747D),
    ("SIO_IDEAL_SEND_BACKLOG_QUERY", 0x4004_747B),
    ("SIO_IDEAL_SEND_BACKLOG_CHANGE", 0x2000_747A),
    ("SIO_RCVALL", wsaiow(IOC_VENDOR, 1)),
    ("SIO_RCVALL_MCAST", wsaiow(IOC_VENDOR, 2)),
    ("SIO_RCVALL_IGMPMCAST", wsaiow(IOC_VENDOR, 3)),
    ("SIO_KEEPALIVE_VALS", wsaiow(IOC_VENDOR, 4)),
    ("SIO_ABSORB_RTRALERT", wsaiow(IOC_VENDOR, 5)),
    ("SIO_UCAST_IF", wsaiow(IOC_VENDOR, 6)),
    ("SIO_LIMIT_BROADCASTS", wsaiow(IOC_VENDOR, 7)),
    ("SIO_INDEX_BIND", wsaiow(IOC_VENDOR, 8)),
    ("SIO_INDEX_MCASTIF", wsaiow(IOC_VENDOR, 9)),
    ("SIO_INDEX_ADD_MCAST", wsaiow(IOC_VENDOR, 10)),
    ("SIO_INDEX_DEL_MCAST", wsaiow(IOC_VENDOR, 11)),
    ("SIO_RCVALL_MCAST_IF", wsaiow(IOC_VENDOR, 13)),
    ("SIO_RCVALL_IF", wsaiow(IOC_VENDOR, 14)),
    ("SIO_LOOPBACK_FAST_PATH", wsaiow(IOC_VENDOR, 16)),
    ("SIO_TCP_INITIAL_RTO", wsaiow(IOC_VENDOR, 17)),
    ("SIO_APPLY_TRANSPORT_SETTING", wsaiow(IOC_VENDOR, 19)),
    ("SIO_QUERY_TRANSPORT_SETTING", wsaiow(IOC_VENDOR, 20)),
    ("SIO_CPU_AFFINITY", wsaiow(IOC_VENDOR, 21)),
    ("SIO_TCP_SET_ICW", wsaiow(IOC_VENDOR, 22)),
    ("SIO_TCP_SET_ACK_FREQUENCY", wsaiow(IOC_VENDOR, 23)),
    ("SIO_SET_PRIORITY_HINT", wsaiow(IOC_VENDOR, 24)),
    ("SIO_TCP_INFO", wsaiorw(IOC_VENDOR, 39)),
    ("SIO_ACQUIRE_PORT_RESERVATION", wsaiow(IOC_VENDOR, 100)),
    ("SIO_RELEASE_PORT_RESERVATION", wsaiow(IOC_VENDOR, 101)),
    ("SIO_ASSOCIATE_PORT_RESERVATION", wsaiow(IOC_VENDOR, 102)),
    ("SIO_SET_SECURITY", wsaiow(IOC_VENDOR, 200)),
    ("SIO_QUERY_SECURITY", wsaiorw(IOC_VENDOR, 201)),
    ("SIO_SET_PEER_TARGET_NAME", wsaiow(IOC_VENDOR, 202)),
    ("SIO_DELETE_PEER_TARGET_NAME", wsaiow(IOC_VENDOR, 203)),
    ("SIO_SOCKET_USAGE_NOTIFICATION", wsaiow(IOC_VENDOR, 204)),
    ("SIO_QUERY_WFP_ALE_ENDPOINT_HANDLE", wsaior(IOC_VENDOR, 205)),
    ("SIO_QUERY_RSS_SCALABILITY_INFO", wsaior(IOC_VENDOR, 210)),
    ("SIO_TIMESTAMPING", wsaiow(IOC_VENDOR, 235)),
];

/// The name of an unserved Windows control code, if `code` is one.
pub fn unserved_code(code: DWORD) -> Option<&'static str> {
    UNSERVED_CODES.iter().find(|&&(_, c)| c == code).map(|&(n, _)| n)
}

/// `CancelIo`/`CancelIoEx`: nothing pending to cancel.
pub const ERROR_NOT_FOUND: c_int = 1168;
/// `CancelIo`/`CancelIoEx`: the handle is not a socket.
pub const ERROR_INVALID_HANDLE: c_int = 6;
/// Overlapped operation not complete yet (`WSAGetOverlappedResult` with `fWait = FALSE`).
pub const WSA_IO_INCOMPLETE: c_int = 996;
/// Not a valid event handle.
pub const WSA_INVALID_HANDLE: c_int = 6;
/// A parameter is out of range (e.g. event count).
pub const WSA_INVALID_PARAMETER: c_int = 87;
/// `WSAOVERLAPPED.Internal` while the operation is pending.
pub const STATUS_PENDING: usize = 0x103;
/// `WSASocket` flag: the socket may run overlapped operations.
pub const WSA_FLAG_OVERLAPPED: DWORD = 0x01;

/// `WSAWaitForMultipleEvents`: first signalled event is `WSA_WAIT_EVENT_0 + i`.
pub const WSA_WAIT_EVENT_0: DWORD = 0;
/// Alertable wait ended because completion routines ran.
pub const WSA_WAIT_IO_COMPLETION: DWORD = 0xC0;
/// The wait timed out.
pub const WSA_WAIT_TIMEOUT: DWORD = 258;
/// The wait failed; see `WSAGetLastError`.
pub const WSA_WAIT_FAILED: DWORD = 0xFFFF_FFFF;
/// Wait without a timeout.
pub const WSA_INFINITE: DWORD = 0xFFFF_FFFF;
/// Most events one wait accepts.
pub const WSA_MAXIMUM_WAIT_EVENTS: DWORD = 64;
