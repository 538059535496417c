//! `WSAOVERLAPPED` and the other caller-visible overlapped structures.
//!
//! The library never dereferences a caller's `WSAOVERLAPPED`: it reads and
//! writes its fields through the kernel (`user_mem`), because the structure
//! may be freed or unmapped by a buggy caller. Field offsets therefore come
//! from the Rust mirror of the struct (`offset_of!`), never from numbers.

use super::*;

/// Windows `WSAOVERLAPPED` (layout of `OVERLAPPED` on 64-bit Windows).
#[repr(C)]
pub struct WSAOVERLAPPED {
    /// `STATUS_PENDING` while pending; then 0 or the WSA error code.
    pub Internal: usize,
    /// Bytes transferred, once complete.
    pub InternalHigh: usize,
    /// Unused by these calls.
    pub Offset: DWORD,
    /// Unused by these calls.
    pub OffsetHigh: DWORD,
    /// Event signalled at completion (when no completion routine is given).
    pub hEvent: WSAEVENT,
}

/// `WSATHREADID` of the service provider interface.
#[repr(C)]
pub struct WSATHREADID {
    /// Thread handle (not used here).
    pub ThreadHandle: *mut c_void,
    /// Reserved.
    pub Reserved: usize,
}

/// Completion routine: `(dwError, cbTransferred, lpOverlapped, dwFlags)`.
pub type LPWSAOVERLAPPED_COMPLETION_ROUTINE = Option<unsafe extern "C" fn(DWORD, DWORD, *mut WSAOVERLAPPED, DWORD)>;

const _: () = assert!(
    std::mem::size_of::<WSAOVERLAPPED>() == 32
        && std::mem::offset_of!(WSAOVERLAPPED, Internal) == 0
        && std::mem::offset_of!(WSAOVERLAPPED, InternalHigh) == 8
        && std::mem::offset_of!(WSAOVERLAPPED, hEvent) == 24
);

/// A caller's `WSAOVERLAPPED`, by address: its fields are read and written
/// through `user_mem`, at the offsets of the Rust mirror above.
#[derive(Clone, Copy)]
pub(crate) struct UserOverlapped(pub(crate) usize);

/// Address of field `$f` of the `WSAOVERLAPPED` at caller address `$ov`.
macro_rules! ov_field {
    ($ov:expr, $f:ident) => {
        $ov.0 + std::mem::offset_of!(WSAOVERLAPPED, $f)
    };
}

impl UserOverlapped {
    /// Whether the whole structure is readable.
    pub(crate) fn readable(self) -> bool {
        probe_readable(self.0, std::mem::size_of::<WSAOVERLAPPED>())
    }

    /// Whether `Internal` and `InternalHigh` are writable (leaving them unchanged).
    pub(crate) fn status_writable(self) -> bool {
        probe_writable(ov_field!(self, Internal), std::mem::size_of::<usize>())
            && probe_writable(ov_field!(self, InternalHigh), std::mem::size_of::<usize>())
    }

    /// `hEvent`.
    pub(crate) fn event(self) -> Option<usize> {
        read_usize(ov_field!(self, hEvent))
    }

    /// `(Internal, InternalHigh)`.
    pub(crate) fn status(self) -> Option<(usize, usize)> {
        Some((read_usize(ov_field!(self, Internal))?, read_usize(ov_field!(self, InternalHigh))?))
    }

    /// Writes `Internal` and `InternalHigh` (InternalHigh first: a reader that sees `Internal` done sees the byte count).
    pub(crate) fn set_status(self, internal: usize, high: usize) -> bool {
        write_user(ov_field!(self, InternalHigh), &high.to_ne_bytes()) && write_user(ov_field!(self, Internal), &internal.to_ne_bytes())
    }
}
