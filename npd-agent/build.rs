//! Builds the eBPF programs (`npd-ebpf`) with the nightly toolchain and bpf-linker, so that the
//! agent can embed the object. `AYA_BUILD_SKIP=1` skips it (lint-only runs); the agent then
//! embeds an empty object and says so when it tries to load it.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    // Without this, a lint run with AYA_BUILD_SKIP=1 leaves an empty object that later
    // builds consider fresh.
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // aya-build does nothing in this case; leave an empty object so include_bytes works.
        fs::write(out_dir.join("npd"), b"").context("writing placeholder eBPF object")?;
        return Ok(());
    }
    // aya-build watches the eBPF crate's directory; the shared records live here.
    println!("cargo:rerun-if-changed=../npd-common");
    use_cached_bpf_linker();
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "npd-ebpf")
        .ok_or_else(|| anyhow!("npd-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .context("npd-ebpf manifest has no parent directory")?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context("building the eBPF programs (is `cargo xtask setup` done?)")
}

/// `cargo xtask setup` builds bpf-linker into its cache (`$NPD_CACHE`, else
/// `$XDG_CACHE_HOME/npd`, else `~/.cache/npd`), outside the checkout. When bpf-linker is not on
/// PATH, the newest cached one that runs is put first on PATH for the eBPF build, so that plain
/// `cargo build`, `cargo test` and `cargo clippy` work after setup.
fn use_cached_bpf_linker() {
    println!("cargo:rerun-if-env-changed=NPD_CACHE");
    println!("cargo:rerun-if-env-changed=PATH");
    let path = env::var_os("PATH").unwrap_or_default();
    if env::split_paths(&path).any(|d| d.join("bpf-linker").is_file()) {
        return;
    }
    let cache = env::var_os("NPD_CACHE")
        .map(PathBuf::from)
        .or_else(|| env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("npd")))
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/npd")));
    let Some(cache) = cache else { return };
    let newest = fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("bpf-linker-"))
        .map(|e| e.path().join("bin"))
        .filter(|bin| {
            std::process::Command::new(bin.join("bpf-linker"))
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .max_by_key(|bin| bin.metadata().and_then(|m| m.modified()).ok());
    if let Some(bin) = newest {
        let joined =
            env::join_paths(std::iter::once(bin).chain(env::split_paths(&path))).unwrap_or(path);
        // SAFETY: the build script is single-threaded; the variable is read by the cargo
        // process aya-build starts next.
        unsafe { env::set_var("PATH", joined) };
    }
}
