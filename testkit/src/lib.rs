//! Helpers the tests (`osbuilder/tests/`, the agent's host tests, unit tests)
//! and the benchmarks (`xtask`) share. Standard library only.

pub mod proxy;
pub mod skip;
