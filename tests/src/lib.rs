//! Harness for npd's integration tests: starting the real agent and a real kube-apiserver
//! (`apiserver`), making real kernel faults happen, and putting every piece of kernel state back afterwards (drop guards, so also when a
//! test fails).
//!
//! Tests that change kernel state must hold [`serial`] for their whole run: they share the
//! kernel (sysctls, /dev/kmsg, the hung-task detector), so they run one at a time even if the
//! test runner was not told `--test-threads=1`.

pub mod agent;
pub mod apiserver;
pub mod corpus;
pub mod faults;
pub mod helm;
pub mod http;
pub mod kernel;
pub mod node;
pub mod podman;
pub mod procstat;
pub mod prometheus;

use std::sync::{Mutex, MutexGuard};

static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises tests that touch kernel state. A panicking test does not poison it for the rest.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a missing prerequisite fails the test instead of skipping it: in CI (`CI=true`,
/// which `.ci/run` sets) and with `NPD_TEST_STRICT=1`.
pub fn strict() -> bool {
    let set = |name: &str, yes: &[&str]| {
        std::env::var(name).is_ok_and(|v| yes.contains(&v.trim().to_ascii_lowercase().as_str()))
    };
    set("CI", &["true", "1", "yes"]) || set("NPD_TEST_STRICT", &["1", "true", "yes"])
}

/// Checks a prerequisite of `test`: true when it is there. When it is not, a strict run (see
/// [`strict`]) fails the test with the reason; otherwise the test is skipped: the reason is
/// printed, and the test's name is appended to the file `NPD_SKIP_LOG` names (which
/// `cargo xtask test` counts in its summary line), and false is returned.
pub fn prerequisite(test: &str, available: Result<(), String>) -> bool {
    let Err(reason) = available else {
        return true;
    };
    if strict() {
        panic!(
            "{test}: missing prerequisite: {reason} (CI=true or NPD_TEST_STRICT=1: not skipped)"
        );
    }
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = std::env::var_os("NPD_SKIP_LOG") {
        use std::io::Write as _;
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = writeln!(f, "{test}: {reason}");
        }
    }
    false
}

/// True when running as root; otherwise the test is skipped (or, in a strict run, fails).
pub fn have_root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    prerequisite(
        test,
        if root {
            Ok(())
        } else {
            Err("needs root (run `cargo xtask test`, which uses sudo when needed)".into())
        },
    )
}

/// The preamble of a test that changes kernel state: holds [`serial`] for the test's whole run
/// and checks for root. `None` when the test is skipped (see [`prerequisite`]):
/// `let Some(_serial) = kernel_test(TEST) else { return };`.
pub fn kernel_test(test: &str) -> Option<MutexGuard<'static, ()>> {
    let guard = serial();
    have_root(test).then_some(guard)
}

/// True when the host has a memory cgroup controller (v2 or v1) for OOM tests; otherwise the
/// test is skipped (or, in a strict run, fails).
pub fn have_memory_cgroup(test: &str) -> bool {
    prerequisite(test, kernel::MemoryController::detect().map(drop))
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
