//! Context layouts: what `SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT` answers.
//!
//! Windows leaves the context's format to the callout, and ports read the
//! layout their own callout wrote; rewire's struct is the default, and this
//! module builds the others from the kernel's answer.

use super::*;

/// Size of the records blob (`struct rw_records`): a buffer this big always holds the answer.
pub const REWIRE_WFP_MAX_RECORDS_SIZE: usize = std::mem::size_of::<RwRecords>();
/// Size of the context (`struct rw_context`).
pub const REWIRE_WFP_MAX_CONTEXT_SIZE: usize = std::mem::size_of::<RwContext>();
const _: () = assert!(REWIRE_WFP_MAX_RECORDS_SIZE == 128 && REWIRE_WFP_MAX_CONTEXT_SIZE == 152);
/// Context layouts (`rewire_wsa_set_context_layout`): rewire's `struct rw_context` (default).
pub const REWIRE_WFP_CONTEXT_LAYOUT_REWIRE: c_int = 0;
/// The layout of Microsoft's sample callout: two `SOCKADDR_STORAGE`, original remote then original local.
pub const REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS: c_int = 1;
/// Size of the two-address context.
pub const REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE: usize = 2 * std::mem::size_of::<libc::sockaddr_storage>();
const _: () = assert!(REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE == 256);
/// The context in the two-address layout: the original remote address (the
/// flow's original destination, from the kernel's context) and the original
/// local address (the application's socket as the service sees it: the
/// accepted socket's peer).
pub(crate) fn sockaddr_context(fd: c_int, optname: c_int) -> Result<[u8; REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE], c_int> {
    let mut buf = [0u8; REWIRE_WFP_MAX_CONTEXT_SIZE];
    let n = rewire::raw_query(fd, optname, &mut buf).map_err(|e| e.wsa_code())?;
    let ctx: RwContext = rewire::abi::read_pod(&buf[..n]).ok_or(WSAEINVAL)?;
    let remote = rewire::RedirectRecords::from_bytes(rewire::abi::pod_bytes(&ctx.records)).map_err(|_| WSAEINVAL)?.original_destination();
    let mut out = [0u8; REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE];
    let half = REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE / 2;
    let remote = socket2::SockAddr::from(remote);
    out[..remote.len() as usize].copy_from_slice(sockaddr_bytes(&remote));
    // SAFETY: an all-zero sockaddr_storage is a valid (unspecified) address.
    let mut local: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the sizes given.
    if unsafe { libc::getpeername(fd, (&mut local as *mut libc::sockaddr_storage).cast(), &mut len) } != 0 {
        return Err(rewire::Error::from_errno(errno()).wsa_code());
    }
    // SAFETY: sockaddr_storage is plain bytes; len <= its size.
    let bytes = unsafe { std::slice::from_raw_parts((&local as *const libc::sockaddr_storage).cast::<u8>(), len as usize) };
    out[half..half + bytes.len()].copy_from_slice(bytes);
    Ok(out)
}

pub(crate) fn sockaddr_bytes(a: &socket2::SockAddr) -> &[u8] {
    // SAFETY: a SockAddr holds a valid sockaddr of a.len() bytes.
    unsafe { std::slice::from_raw_parts(a.as_ptr().cast::<u8>(), a.len() as usize) }
}

/// Chooses the layout of the context query's answer for this process; returns
/// the previous layout, or `SOCKET_ERROR` (`WSAEINVAL`) for an unknown one.
#[no_mangle]
pub extern "C" fn rewire_wsa_set_context_layout(layout: c_int) -> c_int {
    let sockaddrs = match layout {
        REWIRE_WFP_CONTEXT_LAYOUT_REWIRE => false,
        REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS => true,
        _ => {
            set_last_error(WSAEINVAL);
            return SOCKET_ERROR;
        }
    };
    let mut g = lock();
    let old = std::mem::replace(&mut g.sockaddr_context, sockaddrs);
    if old {
        REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS
    } else {
        REWIRE_WFP_CONTEXT_LAYOUT_REWIRE
    }
}

/// The context of the flow on `fd` in the process's layout (what the context query answers).
pub(crate) fn context_answer(fd: c_int) -> Result<Vec<u8>, c_int> {
    if lock().sockaddr_context {
        return sockaddr_context(fd, RW_OPT_CONTEXT).map(|a| a.to_vec());
    }
    let mut buf = [0u8; REWIRE_WFP_MAX_CONTEXT_SIZE];
    match rewire::raw_query(fd, RW_OPT_CONTEXT, &mut buf) {
        Ok(n) if n > 0 => Ok(buf[..n].to_vec()),
        Ok(_) => Err(WSAEINVAL),
        Err(e) => Err(e.wsa_code()),
    }
}
