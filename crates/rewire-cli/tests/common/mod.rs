//! The test kit ([`rewire_testkit`]), and the `rewire` binary cargo built
//! for these tests.

/// Not every test file uses the kit.
#[allow(unused_imports)]
pub use rewire_testkit::*;

/// Not every test file starts `rewire` itself.
#[allow(dead_code)]
pub const REWIRE: &str = env!("CARGO_BIN_EXE_rewire");

pub mod daemon;
