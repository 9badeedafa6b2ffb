//! The static (musl) release build: the agent that ships in the image and runs in the matrix
//! guests, and the guests' own test binaries. `cargo xtask build --static`.

use std::{ffi::OsString, path::PathBuf, process::Stdio};

use anyhow::{Context as _, bail};

use crate::{cargo, describe, locked, output, run};

/// The static target: no C library needed on the node (nor in a busybox initramfs).
pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// Adds the musl target to the stable toolchain when missing.
fn ensure_target() -> anyhow::Result<()> {
    let installed =
        output(std::process::Command::new("rustup").args(["target", "list", "--installed"]))?;
    if !installed.lines().any(|l| l.trim() == TARGET) {
        run(std::process::Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    Ok(())
}

/// Builds `bins` (`(package, binary)`) statically, release, and returns the executables cargo
/// reports, in the same order.
pub fn build_static(path: &OsString, bins: &[(&str, &str)]) -> anyhow::Result<Vec<PathBuf>> {
    ensure_target()?;
    let mut cmd = cargo(path);
    cmd.args([
        "build",
        "--release",
        "--target",
        TARGET,
        "--message-format=json-render-diagnostics",
    ])
    .args(locked());
    for (package, _) in bins {
        cmd.args(["--package", package]);
    }
    for (_, bin) in bins {
        cmd.args(["--bin", bin]);
    }
    // ring compiles a little C and assembly: without a musl cross compiler the host's C
    // compiler does (ring's C needs no libc headers beyond the compiler's own).
    let cc_var = format!("CC_{}", TARGET.replace('-', "_"));
    if std::env::var_os(&cc_var).is_none() && crate::which("x86_64-linux-musl-gcc").is_none() {
        cmd.env(&cc_var, "cc");
    }
    eprintln!("xtask: {}", describe(&cmd));
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {}", describe(&cmd)))?;
    if !out.status.success() {
        bail!("{} failed: {}", describe(&cmd), out.status);
    }
    let messages: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    bins.iter()
        .map(|(_, bin)| {
            messages
                .iter()
                .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == *bin)
                .find_map(|m| m["executable"].as_str().map(PathBuf::from))
                .with_context(|| format!("cargo reported no {bin} executable"))
        })
        .collect()
}

/// The static release agent (`target/x86_64-unknown-linux-musl/release/npd-agent`).
pub fn build_static_agent(path: &OsString) -> anyhow::Result<PathBuf> {
    let agent = build_static(path, &[("npd-agent", "npd-agent")])?
        .pop()
        .context("no agent")?;
    check_static(&agent)?;
    Ok(agent)
}

/// Fails unless `binary` is a statically linked ELF64 (no `PT_INTERP` program header).
pub fn check_static(binary: &std::path::Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    if !has_interpreter(&bytes).with_context(|| format!("{} is not an ELF64", binary.display()))? {
        return Ok(());
    }
    bail!(
        "{} is dynamically linked (it has a program interpreter)",
        binary.display()
    )
}

/// Whether an ELF64 little-endian file has a `PT_INTERP` program header; `None` if not ELF64.
fn has_interpreter(elf: &[u8]) -> Option<bool> {
    if elf.get(..5)? != b"\x7fELF\x02" {
        return None;
    }
    let u16_at = |i: usize| Some(u16::from_le_bytes(elf.get(i..i + 2)?.try_into().ok()?));
    let phoff = u64::from_le_bytes(elf.get(0x20..0x28)?.try_into().ok()?) as usize;
    let phentsize = u16_at(0x36)? as usize;
    let phnum = u16_at(0x38)? as usize;
    const PT_INTERP: u32 = 3;
    Some((0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        elf.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == PT_INTERP)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpreter_is_found() {
        // The running test binary is dynamically linked (glibc).
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(has_interpreter(&me), Some(true));
        assert_eq!(has_interpreter(b"not an elf"), None);
    }
}
