//! `WSASendMsg` and the WFP socket options (`rewire_wsa_setsockopt`): the
//! sending half of the UDP emulation in `msg`.
//!
//! Split from the receiving half because it answers a different question:
//! where a datagram may go. A reply to a flow must leave through the flow's
//! own socket (the kernel refuses any other), and records in a control
//! message are set once on their sending socket, which is then one flow.

use super::*;

/// The records of the control messages of a `WSASendMsg` (None: none given).
fn send_records(m: &WSAMSG) -> Result<Option<Vec<u8>>, c_int> {
    let (base, len) = (m.Control.buf as usize, m.Control.len as usize);
    if len == 0 {
        return Ok(None);
    }
    if len > 4 * MAX_SET_INPUT {
        return Err(WSAEINVAL);
    }
    let mut ctl = vec![0u8; len];
    if !read_user(base, &mut ctl) {
        return Err(WSAEFAULT);
    }
    let mut records = None;
    let mut at = 0;
    while at + CMSG_HDR <= len {
        let clen = usize::from_ne_bytes(ctl[at..at + 8].try_into().expect("8 bytes"));
        let level = c_int::from_ne_bytes(ctl[at + 8..at + 12].try_into().expect("4 bytes"));
        let ty = c_int::from_ne_bytes(ctl[at + 12..at + 16].try_into().expect("4 bytes"));
        if clen < CMSG_HDR || clen > len - at {
            return Err(WSAEINVAL);
        }
        let ours = (level == libc::IPPROTO_IP && ty == IP_WFP_REDIRECT_RECORDS)
            || (level == libc::IPPROTO_IPV6 && ty == IPV6_WFP_REDIRECT_RECORDS);
        if !ours || records.is_some() {
            return Err(WSAEOPNOTSUPP);
        }
        let blob = ctl[at + CMSG_HDR..at + clen].to_vec();
        if rewire::RedirectRecords::from_bytes(&blob).is_err() {
            return Err(WSAEINVAL);
        }
        records = Some(blob);
        at += cmsg_align(clen);
    }
    Ok(records)
}

fn send_msg(s: SOCKET, msg: usize, flags: DWORD, lpcb: usize, ov: usize) -> Result<(DWORD, u64), c_int> {
    let (cookie, m) = super::msg::msg_prologue(s, msg, lpcb, ov)?;
    if flags != 0 {
        return Err(WSAEOPNOTSUPP);
    }
    let count = m.dwBufferCount as usize;
    if count > MAX_BUFFERS {
        return Err(WSAEINVAL);
    }
    let mut data = Vec::new();
    for i in 0..count {
        let b: WSABUF = read_struct(m.lpBuffers as usize + i * std::mem::size_of::<WSABUF>()).ok_or(WSAEFAULT)?;
        if data.len() + b.len as usize > MAX_DATAGRAM {
            return Err(WSAEMSGSIZE);
        }
        let start = data.len();
        data.resize(start + b.len as usize, 0);
        if !read_user(b.buf as usize, &mut data[start..]) {
            return Err(WSAEFAULT);
        }
    }
    let to = if m.name.is_null() {
        None
    } else {
        if m.namelen <= 0 || m.namelen as usize > std::mem::size_of::<libc::sockaddr_storage>() {
            return Err(WSAEFAULT);
        }
        // SAFETY: an all-zero sockaddr_storage is valid.
        let mut st: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: the slice covers the first namelen bytes of st.
        let raw = unsafe { std::slice::from_raw_parts_mut((&mut st as *mut libc::sockaddr_storage).cast::<u8>(), m.namelen as usize) };
        if !read_user(m.name as usize, raw) {
            return Err(WSAEFAULT);
        }
        // SAFETY: st holds namelen bytes of the caller's address.
        Some(sockaddr_of(&unsafe { socket2::SockAddr::new(st, m.namelen as libc::socklen_t) }).ok_or(WSAEINVAL)?)
    };
    let records = send_records(&m)?;
    let sent = |r: std::io::Result<usize>| r.map_err(|e| rewire::Error::from_errno(e.raw_os_error().unwrap_or(libc::EIO)).wsa_code());

    // A reply on a listener to one of its flows: through the flow's socket.
    if let Some(dst) = to {
        let flow = msg_lock().listeners.get(&s).filter(|l| l.cookie == cookie).and_then(|l| l.flows.get(&dst)).map(|f| f.sock.clone());
        if let Some(flow) = flow {
            if records.is_some() {
                return Err(WSAEINVAL);
            }
            return Ok((sent(flow.send(&data))? as DWORD, cookie));
        }
    }
    let borrowed = BorrowedSocket(s);
    let sock = socket2::SockRef::from(&borrowed);
    if let Some(blob) = records {
        let dst = to.or_else(|| sock_name(s, true)).ok_or(WSAEINVAL)?;
        let known = msg_lock().onward.get(&s).filter(|(c, _)| *c == cookie).map(|(_, b)| b.clone());
        match known {
            Some(b) if b == blob => {}
            Some(_) => return Err(WSAEINVAL), // one flow per socket: its records are fixed
            None => {
                rewire::raw_set(s, &blob).map_err(|e| e.wsa_code())?;
                sock.connect(&dst.into()).map_err(|e| rewire::Error::from_errno(e.raw_os_error().unwrap_or(libc::EIO)).wsa_code())?;
                msg_lock().onward.insert(s, (cookie, blob));
            }
        }
        return Ok((sent(sock.send(&data))? as DWORD, cookie));
    }
    let n = match to {
        Some(dst) => sent(sock.send_to(&data, &dst.into()))?,
        None => sent(sock.send(&data))?,
    };
    Ok((n as DWORD, cookie))
}

/// The caller's socket, borrowed for socket2 calls.
struct BorrowedSocket(c_int);

impl std::os::fd::AsFd for BorrowedSocket {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the caller's descriptor, checked open, outlives this call.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.0) }
    }
}

/// `WSASendMsg`. See `wsa.h`.
#[no_mangle]
pub unsafe extern "C" fn WSASendMsg(
    Handle: SOCKET,
    lpMsg: *mut WSAMSG,
    dwFlags: DWORD,
    lpNumberOfBytesSent: *mut DWORD,
    lpOverlapped: *mut WSAOVERLAPPED,
    lpCompletionRoutine: LPWSAOVERLAPPED_COMPLETION_ROUTINE,
) -> c_int {
    let ov = lpOverlapped as usize;
    match send_msg(Handle, lpMsg as usize, dwFlags, lpNumberOfBytesSent as usize, ov) {
        Ok((n, cookie)) => {
            if !lpNumberOfBytesSent.is_null() && !write_dword(lpNumberOfBytesSent as usize, n) {
                set_last_error(WSAEFAULT);
                return SOCKET_ERROR;
            }
            report_done(Handle, cookie, ov, lpCompletionRoutine, 0, n as usize);
            0
        }
        Err(code) => {
            set_last_error(code);
            SOCKET_ERROR
        }
    }
}

/// `setsockopt` for the two WFP options (`IP_WFP_REDIRECT_RECORDS` /
/// `IP_WFP_REDIRECT_CONTEXT`, levels `IPPROTO_IP` / `IPPROTO_IPV6`, a
/// `DWORD` boolean): whether `WSARecvMsg` adds that control message. Any
/// other option goes to `setsockopt(2)`. See `wsa.h`.
#[no_mangle]
pub unsafe extern "C" fn rewire_wsa_setsockopt(s: SOCKET, level: c_int, optname: c_int, optval: *const c_void, optlen: c_int) -> c_int {
    let ours = matches!((level, optname), (libc::IPPROTO_IP, IP_WFP_REDIRECT_RECORDS | IP_WFP_REDIRECT_CONTEXT))
        || matches!((level, optname), (libc::IPPROTO_IPV6, IPV6_WFP_REDIRECT_RECORDS | IPV6_WFP_REDIRECT_CONTEXT));
    if !ours {
        // SAFETY: forwarded unchanged; the kernel copies optval (EFAULT if bad).
        let rc = unsafe { libc::setsockopt(s, level, optname, optval, optlen.max(0) as libc::socklen_t) };
        if rc != 0 {
            set_last_error(rewire::Error::from_errno(errno()).wsa_code());
            return SOCKET_ERROR;
        }
        return 0;
    }
    let Some(cookie) = (if is_socket(s) { cookie_of(s) } else { None }) else {
        set_last_error(WSAENOTSOCK);
        return SOCKET_ERROR;
    };
    if (optlen as usize) < std::mem::size_of::<DWORD>() || optlen < 0 {
        set_last_error(WSAEFAULT);
        return SOCKET_ERROR;
    }
    let mut v = [0u8; 4];
    if !read_user(optval as usize, &mut v) {
        set_last_error(WSAEFAULT);
        return SOCKET_ERROR;
    }
    if !is_udp(s) {
        set_last_error(WSAEINVAL);
        return SOCKET_ERROR;
    }
    let on = u32::from_ne_bytes(v) != 0;
    // Flow sockets share the listener's address: it must allow that.
    set_reuseport(s);
    let mut m = msg_lock();
    let w = m.wanted.entry(s).or_default();
    if w.cookie != cookie {
        *w = Wanted { cookie, ..Default::default() };
    }
    if optname == IP_WFP_REDIRECT_RECORDS {
        w.records = on;
    } else {
        w.context = on;
    }
    0
}
