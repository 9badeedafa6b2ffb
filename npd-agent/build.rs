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
