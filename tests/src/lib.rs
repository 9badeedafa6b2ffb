//! Harness for npd's integration tests: starting the real agent and a real kube-apiserver
//! (`apiserver`), making real kernel faults happen, and putting every piece of kernel state back afterwards (drop guards, so also when a
//! test fails).
//!
//! Tests that change kernel state must hold [`serial`] for their whole run: they share the
//! kernel (sysctls, /dev/kmsg, the hung-task detector), so they run one at a time even if the
//! test runner was not told `--test-threads=1`.

pub mod agent;
pub mod apiserver;
pub mod faults;
pub mod http;
pub mod kernel;
pub mod prometheus;

use std::sync::{Mutex, MutexGuard};

static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises tests that touch kernel state. A panicking test does not poison it for the rest.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// True when running as root; otherwise prints why the test is skipped.
pub fn have_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!(
            "SKIPPED {test}: needs root (run `cargo xtask test`, which uses sudo when needed)"
        );
    }
    root
}

/// A name unique to this process and call, for markers, cgroups and files.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}
