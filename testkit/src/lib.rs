//! Helpers the integration tests (`osbuilder/tests/`) and the benchmarks
//! (`xtask`) share. Standard library only.

pub mod proxy;
