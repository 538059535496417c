//! What loading, attaching, filling and reading the hooks can meet, and
//! the wrapper that lets aya store an ABI struct in a map. Below
//! [`crate::hooks`], [`crate::tables`], [`crate::counters`], [`crate::cover`]
//! and [`crate::persist`], which all use them, so none of those imports
//! another for its error type.

use std::path::PathBuf;

use rewire::abi::{self, RwAccessKey, RwAddr, RwConf, RwIdentKey, RwLink, RwLinkKey, RwRule, RwService, RwSock, RwTuple, RwUdpHandoff};

/// Loading or attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum HooksError {
    /// The object could not be loaded (verifier, kernel support).
    #[error("loading rewire's BPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("program {name}: {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// Why.
        source: aya::programs::ProgramError,
    },
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// Why.
        source: aya::maps::MapError,
    },
    /// Pinning failed.
    #[error("pin {path}: {message}")]
    Pin {
        /// Where.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The configuration cannot be turned into kernel rules.
    #[error("{0}")]
    Config(String),
    /// BPF run-time statistics could not be turned on.
    #[error("enabling BPF run-time statistics: {0}")]
    Stats(std::io::Error),
    /// A bpf(2) command of the persistent hooks failed (see [`crate::persist`]).
    #[error("{what}: {source}")]
    Sys {
        /// What was attempted.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A covered cgroup, a service's cgroup or a selector cannot be used.
    #[error(transparent)]
    Cover(#[from] crate::cover::CoverError),
    /// File system error (opening the cgroup).
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// An ABI struct as a map key or value (aya needs its own Pod marker).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub(crate) struct Pod<T>(pub(crate) T);
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwConf> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwRule> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwService> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwAccessKey> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwAddr> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwTuple> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwSock> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwUdpHandoff> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwIdentKey> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwLinkKey> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<RwLink> {}
// SAFETY: the wrapped ABI struct is repr(C) integers and arrays (see rewire::abi).
unsafe impl aya::Pod for Pod<abi::RwSel> {}

/// A bpf(2) command's failure as a [`HooksError::Sys`], saying what was attempted.
pub(crate) fn sys(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HooksError {
    let what = what.into();
    move |source| HooksError::Sys { what, source }
}
