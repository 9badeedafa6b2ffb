//! Harness for npd integration tests.

pub mod apiserver;
