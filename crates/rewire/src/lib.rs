//! # rewire: connection redirect records for Linux
//!
//! The Linux face of the Windows Filtering Platform's redirect-record
//! control codes. A rewire-managed cgroup's connects are redirected by eBPF
//! hooks to registered local proxies; each proxy, on its accepted socket,
//! queries the flow's records and context, and sets the records on its own
//! outbound socket, so any number of proxies chain without looping.
//!
//! | Windows control code | here |
//! |---|---|
//! | `SIO_QUERY_WFP_CONNECTION_REDIRECT_RECORDS` | [`query_redirect_records`] |
//! | `SIO_QUERY_WFP_CONNECTION_REDIRECT_CONTEXT` | [`query_redirect_context`] |
//! | `SIO_SET_WFP_CONNECTION_REDIRECT_RECORDS` | [`set_redirect_records`] |
//!
//! [`query_redirect`] answers both queries in one kernel round trip (what a
//! proxy that logs the context and carries the records onward wants).
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = std::net::TcpListener::bind("127.0.0.1:15001")?;
//! let (client, _) = listener.accept()?;
//! let (records, ctx) = rewire::query_redirect(&client)?; // one getsockopt for both
//! println!("{} (pid {}) -> {}", ctx.command, ctx.pid, ctx.original_destination);
//! let upstream = rewire::connect_onward(&records)?; // new socket + set records + connect
//! # let _ = upstream; Ok(()) }
//! ```
//!
//! UDP flows work the same way on a connected socket: see [`udp`].

pub mod abi;
mod calls;
mod context;
mod context_layout;
mod error;
mod records;
mod service;
mod state;
pub mod udp;

#[cfg(feature = "tokio")]
pub mod asynchronous;

pub use calls::{
    accelerate, connect_onward, is_accelerated, original_destination, query_redirect, query_redirect_context, query_redirect_records,
    raw_query, raw_set, set_redirect_records, MAX_ANSWER_LEN,
};
pub use context::{boot_ns_to_system_time, comm_to_string, KernelIdentity, RedirectContext};
pub use context_layout::{ContextLayout, MAX_VENDOR_CONTEXT};
pub use error::{wsa, Error, Result};
pub use records::{ParseError, RedirectRecords};
pub use service::ServiceId;
pub use state::RedirectState;
