//! `SIO_GET_EXTENSION_FUNCTION_POINTER`: how a Windows program gets
//! `WSARecvMsg` and `WSASendMsg`.
//!
//! Winsock hands out its Microsoft extensions only as function pointers,
//! looked up by GUID through `WSAIoctl`; a port keeps that code unchanged,
//! so the lookup answers the two GUIDs rewire serves, `WSAEOPNOTSUPP` for
//! the other extension GUIDs Windows defines, and `WSAEINVAL` for any other.

use super::*;

/// Windows `GUID`.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct GUID {
    /// First 32 bits.
    pub Data1: u32,
    /// Next 16 bits.
    pub Data2: u16,
    /// Next 16 bits.
    pub Data3: u16,
    /// Last 64 bits, as bytes.
    pub Data4: [u8; 8],
}

const fn guid(d1: u32, d2: u16, d3: u16, d4: [u8; 8]) -> GUID {
    GUID { Data1: d1, Data2: d2, Data3: d3, Data4: d4 }
}

/// `WSAID_WSARECVMSG` (mswsock.h).
pub const WSAID_WSARECVMSG: GUID = guid(0xf689d7c8, 0x6f1f, 0x436b, [0x8a, 0x53, 0xe5, 0x4f, 0xe3, 0x51, 0xc3, 0x22]);
/// `WSAID_WSASENDMSG` (mswsock.h).
pub const WSAID_WSASENDMSG: GUID = guid(0xa441e712, 0x754f, 0x43ca, [0x84, 0xa7, 0x0d, 0xee, 0x44, 0xcf, 0x60, 0x6d]);

/// Extension GUIDs of mswsock.h rewire does not serve (`WSAEOPNOTSUPP`).
pub const UNSERVED_EXTENSIONS: &[(&str, GUID)] = &[
    ("WSAID_ACCEPTEX", guid(0xb5367df1, 0xcbac, 0x11cf, [0x95, 0xca, 0x00, 0x80, 0x5f, 0x48, 0xa1, 0x92])),
    ("WSAID_CONNECTEX", guid(0x25a207b9, 0xddf3, 0x4660, [0x8e, 0xe9, 0x76, 0xe5, 0x8c, 0x74, 0x06, 0x3e])),
    ("WSAID_DISCONNECTEX", guid(0x7fda2e11, 0x8630, 0x436f, [0xa0, 0x31, 0xf5, 0x36, 0xa6, 0xee, 0xc1, 0x57])),
    ("WSAID_GETACCEPTEXSOCKADDRS", guid(0xb5367df2, 0xcbac, 0x11cf, [0x95, 0xca, 0x00, 0x80, 0x5f, 0x48, 0xa1, 0x92])),
    ("WSAID_TRANSMITFILE", guid(0xb5367df0, 0xcbac, 0x11cf, [0x95, 0xca, 0x00, 0x80, 0x5f, 0x48, 0xa1, 0x92])),
    ("WSAID_TRANSMITPACKETS", guid(0xd9689da0, 0x1f90, 0x11d3, [0x99, 0x71, 0x00, 0xc0, 0x4f, 0x68, 0xc8, 0x76])),
];

/// Answers `SIO_GET_EXTENSION_FUNCTION_POINTER`: the function's address
/// written to `outb`, its size returned. `cbInBuffer` must be the size of a
/// GUID and the output hold a pointer.
pub(crate) fn extension_pointer(inb: usize, cb_in: DWORD, outb: usize, cb_out: DWORD) -> Result<DWORD, c_int> {
    if inb == 0 || outb == 0 {
        return Err(WSAEFAULT);
    }
    if cb_in as usize != std::mem::size_of::<GUID>() {
        return Err(WSAEINVAL);
    }
    if (cb_out as usize) < std::mem::size_of::<usize>() {
        return Err(WSAEFAULT);
    }
    let id: GUID = read_struct(inb).ok_or(WSAEFAULT)?;
    let f: usize = if id == WSAID_WSARECVMSG {
        rewire_wsa_recvmsg as *const () as usize
    } else if id == WSAID_WSASENDMSG {
        WSASendMsg as *const () as usize
    } else if UNSERVED_EXTENSIONS.iter().any(|&(_, g)| g == id) {
        return Err(WSAEOPNOTSUPP);
    } else {
        return Err(WSAEINVAL);
    };
    if !write_user(outb, &f.to_ne_bytes()) {
        return Err(WSAEFAULT);
    }
    Ok(std::mem::size_of::<usize>() as DWORD)
}
