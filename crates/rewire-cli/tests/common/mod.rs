//! The test kit ([`rewire_testkit`]), and the `rewire` binary cargo built
//! for these tests.

pub use rewire_testkit::*;

/// Not every test file starts `rewire` itself.
#[allow(dead_code)]
pub const REWIRE: &str = env!("CARGO_BIN_EXE_rewire");
