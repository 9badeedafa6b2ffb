//! `cargo xtask image`: npd's OCI image, built with no Docker daemon and nothing pulled from a
//! container registry: `FROM scratch`, the static (musl) release agent, a static busybox for
//! `/bin/sh`, and the default rules, with NPD's paths so that an NPD manifest or chart keeps
//! working when only its image changes:
//!
//! * `/npd-agent`, and the same binary as `/node-problem-detector` (a symbolic link);
//! * `/config/`: npd's rules under NPD's file names (`kernel-monitor.json` is NPD's kernel
//!   monitor with npd's additions: the current kernels' wording and the structured rules on
//!   the eBPF events; `readonly-monitor.json` is NPD's; `docker-monitor.json` is NPD's
//!   journald monitor, which npd names and does not run), and npd's own files beside them;
//! * `/bin/sh`: Debian's busybox-static, for charts that start the agent through a shell.
//!
//! Podman (Debian's) builds it from the assembled root file system, writes it as an OCI
//! archive under `target/`, and keeps it in local podman storage. `--rootfs DIR` only
//! assembles the root file system (what `deploy/Dockerfile` uses, so that a Docker build makes
//! the same binary the same way).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cache_dir, debian, output, run, static_build};

/// The image's name in local storage.
pub fn image_name() -> String {
    format!("localhost/npd:{}", env!("CARGO_PKG_VERSION"))
}

/// Where the OCI archive is written.
pub fn archive_path(root: &Path) -> PathBuf {
    root.join("target/npd-image.oci.tar")
}

/// The rule files of `config/` merged into NPD's `kernel-monitor.json` shape, in this order;
/// all share its `source` and its conditions.
const KERNEL_MONITOR_PARTS: [&str; 3] = [
    "kernel-monitor.json",
    "kernel-monitor-current.json",
    "structured.json",
];

/// Builds the image (or, with `rootfs`, only its root file system there).
pub fn image(
    path: &std::ffi::OsString,
    root: &Path,
    rootfs: Option<PathBuf>,
) -> anyhow::Result<()> {
    let agent = static_build::build_static_agent(path)?;
    let work = root.join("target/npd-image");
    let rootfs_dir = rootfs.clone().unwrap_or_else(|| work.join("rootfs"));
    assemble(root, &agent, &rootfs_dir)?;
    if rootfs.is_some() {
        eprintln!("xtask: image root file system in {}", rootfs_dir.display());
        return Ok(());
    }
    ensure_podman()?;
    let containerfile = work.join("Containerfile");
    std::fs::write(&containerfile, containerfile_text())?;
    let name = image_name();
    run(podman()
        .args([
            "build",
            "--quiet",
            "--no-cache",
            "--pull=never",
            "-t",
            &name,
            "-f",
        ])
        .arg(&containerfile)
        .arg(&work))?;
    let archive = archive_path(root);
    let _ = std::fs::remove_file(&archive);
    run(podman()
        .args(["save", "--format", "oci-archive", "-o"])
        .arg(&archive)
        .arg(&name))?;
    let size: u64 = output(podman().args(["image", "inspect", "--format", "{{.Size}}", &name]))?
        .trim()
        .parse()
        .unwrap_or(0);
    println!(
        "xtask: image {name}: {:.1} MB uncompressed ({size} bytes); OCI archive {}",
        size as f64 / 1e6,
        archive.display()
    );
    Ok(())
}

/// The Containerfile of the assembled root file system (labels from the workspace).
fn containerfile_text() -> String {
    format!(
        "FROM scratch\n\
         COPY rootfs/ /\n\
         LABEL org.opencontainers.image.title=\"npd\" \\\n\
         \x20     org.opencontainers.image.description=\"eBPF kernel problem sensor for Kubernetes nodes, a drop-in successor to node-problem-detector\" \\\n\
         \x20     org.opencontainers.image.version=\"{version}\" \\\n\
         \x20     org.opencontainers.image.source=\"{source}\" \\\n\
         \x20     org.opencontainers.image.licenses=\"Apache-2.0 AND (GPL-2.0-only OR MIT)\"\n\
         ENTRYPOINT [\"/npd-agent\"]\n\
         CMD [\"run\"]\n",
        version = env!("CARGO_PKG_VERSION"),
        source = env!("CARGO_PKG_REPOSITORY"),
    )
}

/// Podman with a private configuration: no default ulimits (this sandbox cannot set them),
/// storage in podman's default place (so `podman run` finds the image).
pub fn podman() -> Command {
    let conf = cache_dir().join("podman/containers.conf");
    if !conf.is_file() {
        let _ = std::fs::create_dir_all(conf.parent().unwrap_or(Path::new("/")));
        let _ = std::fs::write(&conf, "[containers]\ndefault_ulimits = []\n");
    }
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf);
    cmd
}

/// Installs Debian's podman (and runc: crun refuses a host with cgroups in hybrid mode) when
/// missing.
pub fn ensure_podman() -> anyhow::Result<()> {
    let have = |program: &str| crate::which(program).is_some();
    if have("podman") && have("runc") {
        return Ok(());
    }
    run(Command::new("apt-get")
        .args([
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            "podman",
            "runc",
        ])
        .env("DEBIAN_FRONTEND", "noninteractive"))
    .context("installing podman and runc with apt-get (as root)")
}

/// Writes the image's root file system into `dir` (emptied first).
fn assemble(root: &Path, agent: &Path, dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("emptying {}", dir.display()))?;
    }
    for sub in ["bin", "config"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    run(Command::new("strip")
        .arg("--strip-all")
        .arg("-o")
        .arg(dir.join("npd-agent"))
        .arg(agent))
    .context("strip (binutils)")?;
    std::os::unix::fs::symlink("npd-agent", dir.join("node-problem-detector"))?;
    let busybox = busybox()?;
    std::fs::copy(&busybox, dir.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", dir.join("bin/sh"))?;
    let config = root.join("config");
    std::fs::write(
        dir.join("config/kernel-monitor.json"),
        kernel_monitor(&config)?,
    )?;
    for file in [
        "readonly-monitor.json",
        "kernel-monitor-current.json",
        "structured.json",
    ] {
        std::fs::copy(config.join(file), dir.join("config").join(file))?;
    }
    std::fs::copy(
        root.join("deploy/image/config/docker-monitor.json"),
        dir.join("config/docker-monitor.json"),
    )?;
    Ok(())
}

/// Debian's static busybox (bookworm), through the private apt configuration.
fn busybox() -> anyhow::Result<PathBuf> {
    let dir = cache_dir().join("image");
    let apt = debian::Apt::new(&dir)?;
    debian::ensure_busybox(&dir, &apt)
}

/// NPD's `kernel-monitor.json` with npd's additions (see [`KERNEL_MONITOR_PARTS`]): one file
/// with NPD's name, its source and conditions, and every rule of the parts in order.
pub fn kernel_monitor(config: &Path) -> anyhow::Result<String> {
    let read = |name: &str| -> anyhow::Result<serde_json::Value> {
        let path = config.join(name);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
    };
    let mut merged = read(KERNEL_MONITOR_PARTS[0])?;
    let source = merged["source"].clone();
    for part in &KERNEL_MONITOR_PARTS[1..] {
        let file = read(part)?;
        if file["source"] != source {
            bail!("{part}: its source {} is not {source}", file["source"]);
        }
        if file["conditions"].as_array().is_some_and(|c| !c.is_empty()) {
            bail!("{part} declares conditions; only kernel-monitor.json may");
        }
        let rules = file["rules"].as_array().cloned().unwrap_or_default();
        merged["rules"]
            .as_array_mut()
            .context("kernel-monitor.json has no rules array")?
            .extend(rules);
    }
    Ok(serde_json::to_string_pretty(&merged)? + "\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_images_kernel_monitor_holds_every_default_kernel_rule() {
        let config = crate::workspace_root().join("config");
        let merged: serde_json::Value =
            serde_json::from_str(&kernel_monitor(&config).unwrap()).unwrap();
        let count = |name: &str| {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(config.join(name)).unwrap()).unwrap();
            v["rules"].as_array().map_or(0, Vec::len)
        };
        let expected: usize = KERNEL_MONITOR_PARTS.iter().map(|p| count(p)).sum();
        assert_eq!(merged["rules"].as_array().unwrap().len(), expected);
        assert_eq!(merged["source"], "kernel-monitor");
        assert!(!merged["conditions"].as_array().unwrap().is_empty());
    }
}
