//! Harness for npd integration tests.
