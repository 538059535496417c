//! Context layouts: what `SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT` answers.
//!
//! Windows leaves the context's format to the callout, and ports read the
//! layout their own callout wrote. Each service's layout comes from its
//! `context` in the config (`rewire::ContextLayout`: rewire's struct, the
//! default; the two-address layout; or opaque vendor bytes), read from the
//! layouts file the daemon or `rewire run` published for the configuration
//! the kernel runs (`$REWIRE_LAYOUTS`, set by `rewire run`/`exec`; not the
//! config file, which may be edited or refused by a reload) and looked up
//! by the service id the kernel wrote in the flow's context; a process may override
//! it for all its sockets (`rewire_wsa_set_context_layout`). This module
//! resolves the layout and builds the answer from the kernel's context.

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
/// The layout the service's config names (`context = ...`; the default).
pub const REWIRE_WFP_CONTEXT_LAYOUT_SERVICE: c_int = 2;
/// Most vendor context bytes a service's config may give.
pub const REWIRE_WFP_MAX_VENDOR_CONTEXT_SIZE: usize = rewire::MAX_VENDOR_CONTEXT;
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

/// Chooses the layout of the context query's answer for every socket of
/// this process (`REWIRE_WFP_CONTEXT_LAYOUT_SERVICE`: each service's as
/// configured, the default); returns the previous choice, or
/// `SOCKET_ERROR` (`WSAEINVAL`) for an unknown one.
#[no_mangle]
pub extern "C" fn rewire_wsa_set_context_layout(layout: c_int) -> c_int {
    if !matches!(layout, REWIRE_WFP_CONTEXT_LAYOUT_REWIRE | REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS | REWIRE_WFP_CONTEXT_LAYOUT_SERVICE) {
        set_last_error(WSAEINVAL);
        return SOCKET_ERROR;
    }
    std::mem::replace(&mut lock().context_layout, layout)
}

/// The flow's context as the kernel holds it (the flow must be one rewire redirected).
fn kernel_context(fd: c_int) -> Result<RwContext, c_int> {
    let mut buf = [0u8; REWIRE_WFP_MAX_CONTEXT_SIZE];
    let n = rewire::raw_query(fd, RW_OPT_CONTEXT, &mut buf).map_err(|e| e.wsa_code())?;
    rewire::abi::read_pod(&buf[..n]).ok_or(WSAEINVAL)
}

/// The layout of service `service_id` in the configuration the kernel runs:
/// the layouts file rewire published at the last accepted load or reload
/// (`$REWIRE_LAYOUTS`, re-read when it is replaced), never the config file,
/// which may have been edited since or refused. Without `$REWIRE_LAYOUTS`
/// (not started by rewire), or where nothing was published there (hooks
/// attached by something that publishes no layouts: a test harness, a
/// daemon of an older version), rewire's own struct, whose fields are the
/// kernel's; a file that cannot be read or has no entry for the id is
/// `WSAEINVAL`, never another service's layout.
fn configured(service_id: u16) -> Result<rewire::ContextLayout, c_int> {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        service: Vec<Svc>,
    }
    #[derive(serde::Deserialize)]
    struct Svc {
        id: u16,
        #[serde(default)]
        context: rewire::ContextLayout,
    }
    type Key = (u64, u64, Option<std::time::SystemTime>);
    type Cache = Option<(std::path::PathBuf, Key, Option<Vec<(u16, rewire::ContextLayout)>>)>;
    static CACHE: Mutex<Cache> = Mutex::new(None);
    let Some(path) = std::env::var_os("REWIRE_LAYOUTS").map(std::path::PathBuf::from) else { return Ok(Default::default()) };
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Default::default()),
        Err(_) => return Err(WSAEINVAL),
    };
    // Replaced by rename: a new inode.
    let key = (meta.dev(), meta.ino(), meta.modified().ok());
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let fresh = matches!(&*cache, Some((p, k, _)) if *p == path && *k == key);
    if !fresh {
        let layouts = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| toml::from_str::<File>(&text).ok())
            .map(|f| f.service.into_iter().map(|s| (s.id, s.context)).collect());
        *cache = Some((path, key, layouts));
    }
    cache
        .as_ref()
        .and_then(|(_, _, l)| l.as_ref())
        .and_then(|l| l.iter().find(|(id, _)| *id == service_id))
        .map(|(_, c)| c.clone())
        .ok_or(WSAEINVAL)
}

/// The layout the context query answers on socket `fd`: the process's
/// choice, else the layout of the service the flow was redirected to in
/// the configuration the kernel runs (rewire's struct where the flow has
/// no context: the query then fails as it would anyway). `WSAEINVAL` when
/// that service's layout cannot be known.
pub(crate) fn layout_for(fd: c_int) -> Result<rewire::ContextLayout, c_int> {
    match lock().context_layout {
        REWIRE_WFP_CONTEXT_LAYOUT_REWIRE => Ok(rewire::ContextLayout::Rewire),
        REWIRE_WFP_CONTEXT_LAYOUT_SOCKADDRS => Ok(rewire::ContextLayout::Sockaddrs),
        _ => match kernel_context(fd) {
            Ok(c) => configured(c.service_id),
            Err(_) => Ok(Default::default()),
        },
    }
}

/// Bytes the answer takes in the caller's buffer.
pub(crate) fn answer_size(optname: c_int, layout: &rewire::ContextLayout) -> usize {
    match layout {
        _ if optname == RW_OPT_RECORDS => REWIRE_WFP_MAX_RECORDS_SIZE,
        rewire::ContextLayout::Rewire => REWIRE_WFP_MAX_CONTEXT_SIZE,
        rewire::ContextLayout::Sockaddrs => REWIRE_WFP_SOCKADDRS_CONTEXT_SIZE,
        rewire::ContextLayout::Vendor(b) => b.len(),
    }
}

/// The answer of a records (`RW_OPT_RECORDS`) or context query on `fd` in `layout`.
pub(crate) fn answer(fd: c_int, optname: c_int, layout: &rewire::ContextLayout) -> Result<Vec<u8>, c_int> {
    match layout {
        rewire::ContextLayout::Sockaddrs if optname == RW_OPT_CONTEXT => sockaddr_context(fd, optname).map(|a| a.to_vec()),
        rewire::ContextLayout::Vendor(bytes) if optname == RW_OPT_CONTEXT => {
            // Only for a flow rewire redirected, as any context answer.
            kernel_context(fd)?;
            Ok(bytes.clone())
        }
        _ => {
            let mut buf = [0u8; REWIRE_WFP_MAX_CONTEXT_SIZE];
            let want = answer_size(optname, &rewire::ContextLayout::Rewire);
            match rewire::raw_query(fd, optname, &mut buf[..want]) {
                Ok(n) if n > 0 => Ok(buf[..n].to_vec()),
                Ok(_) => Err(WSAEINVAL),
                Err(e) => Err(e.wsa_code()),
            }
        }
    }
}

/// The context of the flow on `fd` as the query answers it (`WSARecvMsg`'s control message).
pub(crate) fn context_answer(fd: c_int) -> Result<Vec<u8>, c_int> {
    answer(fd, RW_OPT_CONTEXT, &layout_for(fd)?)
}
