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
    strict_from(
        std::env::var("CI").ok().as_deref(),
        std::env::var("NPD_TEST_STRICT").ok().as_deref(),
    )
}

/// [`strict`] from the values of `CI` and `NPD_TEST_STRICT`: `CI=false` is not CI.
fn strict_from(ci: Option<&str>, strict: Option<&str>) -> bool {
    let yes = |v: Option<&str>| {
        v.is_some_and(|v| ["true", "1", "yes"].contains(&v.trim().to_ascii_lowercase().as_str()))
    };
    yes(ci) || yes(strict)
}

/// Checks a prerequisite of `test`: true when it is there. When it is not, a strict run (see
/// [`strict`]) fails the test with the reason; otherwise the test is skipped: the reason is
/// printed, and the test's name is appended to the file `NPD_SKIP_LOG` names (which
/// `cargo xtask test` counts in its summary line), and false is returned.
pub fn prerequisite(test: &str, available: Result<(), String>) -> bool {
    prerequisite_with(
        test,
        available,
        strict(),
        std::env::var_os("NPD_SKIP_LOG").as_deref(),
    )
}

/// [`prerequisite`] with its environment given: whether the run is strict, and the skip log.
fn prerequisite_with(
    test: &str,
    available: Result<(), String>,
    strict: bool,
    skip_log: Option<&std::ffi::OsStr>,
) -> bool {
    let Err(reason) = available else {
        return true;
    };
    if strict {
        panic!(
            "{test}: missing prerequisite: {reason} (CI=true or NPD_TEST_STRICT=1: not skipped)"
        );
    }
    eprintln!("SKIPPED {test}: {reason}");
    if let Some(log) = skip_log {
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

/// A benchmark's setting from the environment variable `name`, else `default` (also when it
/// does not parse).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

#[cfg(test)]
mod harness_tests {
    use super::*;

    #[test]
    fn ci_and_npd_test_strict_make_a_run_strict() {
        assert!(strict_from(Some("true"), None));
        assert!(strict_from(Some("1"), None));
        assert!(strict_from(None, Some("1")));
        assert!(strict_from(Some("false"), Some("YES")));
        assert!(!strict_from(None, None));
        assert!(!strict_from(Some("false"), None));
        assert!(!strict_from(Some("0"), Some("no")));
    }

    #[test]
    #[should_panic(expected = "the test: missing prerequisite: no API server")]
    fn a_missing_prerequisite_fails_a_strict_run() {
        prerequisite_with("the test", Err("no API server".into()), true, None);
    }

    #[test]
    fn a_missing_prerequisite_is_a_logged_skip_otherwise() {
        let dir = std::env::temp_dir().join(format!("npd-skip-test-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        assert!(prerequisite_with(
            "present",
            Ok(()),
            true,
            Some(dir.as_os_str())
        ));
        assert!(!prerequisite_with(
            "absent",
            Err("no root".into()),
            false,
            Some(dir.as_os_str())
        ));
        let log = std::fs::read_to_string(&dir).expect("the skip log");
        let _ = std::fs::remove_file(&dir);
        assert_eq!(log, "absent: no root\n");
    }
}
