//! `cargo xtask matrix`: the same static build on Debian's kernels, each booted under qemu
//! (software emulation), real faults inside, a report read back over the guest's second serial
//! port. How it works, and what differs between the kernels: `docs/kernel-matrix.md`.
//!
//! Everything it needs comes from Debian's archive through a private apt configuration
//! (nothing is installed into the host) and is cached under `$NPD_CACHE/matrix`: the kernel
//! packages, QEMU 10 from bookworm-backports with its libraries (run through its own dynamic
//! loader, so the host's libraries do not matter), and busybox-static.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::debian::{Apt, ensure_busybox, unpack};
use crate::{cache_dir, describe, output, run};

/// One guest kernel: Debian's package(s), by exact version. This is the one table of kernel
/// packages; `docs/kernel-matrix.md` shows it (a unit test keeps the two in step).
pub struct Kernel {
    /// What `--kernel` takes.
    pub name: &'static str,
    /// `uname -r`, and the directory of its formats in `npd-agent/testdata/formats`.
    pub release: &'static str,
    /// The Debian suite it comes from.
    pub suite: &'static str,
    /// Packages and exact versions: the kernel image, and the modules where they are split out.
    pub packages: &'static [(&'static str, &'static str)],
}

/// Debian's kernels whose tracepoint formats are in `npd-agent/testdata/formats`.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        name: "5.10",
        release: "5.10.0-32-cloud-amd64",
        suite: "bullseye",
        packages: &[("linux-image-5.10.0-32-cloud-amd64", "5.10.223-1")],
    },
    Kernel {
        name: "6.1",
        release: "6.1.0-50-cloud-amd64",
        suite: "bookworm",
        packages: &[("linux-image-6.1.0-50-cloud-amd64", "6.1.176-1")],
    },
    Kernel {
        name: "6.12",
        release: "6.12.107+deb13-cloud-amd64",
        suite: "trixie",
        packages: &[("linux-image-6.12.107+deb13-cloud-amd64", "6.12.107-1")],
    },
    Kernel {
        name: "7.2",
        release: "7.2.13+deb14-cloud-amd64",
        suite: "sid",
        packages: &[
            ("linux-binary-7.2.13+deb14-cloud-amd64", "7.2.13-1"),
            ("linux-modules-7.2.13+deb14-cloud-amd64", "7.2.13-1"),
            // The kernel's config and modules.builtin.
            ("linux-base-7.2.13+deb14-cloud-amd64", "7.2.13-1"),
        ],
    },
];

/// QEMU from bookworm-backports (10.0; bookworm's 7.2 oopses 6.12 guests).
const QEMU_PACKAGE: &str = "qemu-system-x86";
const QEMU_SUITE: &str = "bookworm-backports";
const QEMU_MAJOR: &str = "10.";
/// Modules the checks need (with their dependencies), where the kernel has them as modules.
const MODULES: &[&str] = &["loop", "virtio_pci", "virtio_blk"];
/// The blkdebug disk: its serial (how the guest finds it) and the 512-byte sectors that fail.
const FAULTY_SERIAL: &str = "npd-faulty";
/// A plain disk with ext4 (made by the host's mkfs.ext4), for the loop device's backing file.
const SCRATCH_SERIAL: &str = "npd-scratch";
const READ_ERROR_SECTOR: u64 = 8192;
const WRITE_ERROR_SECTOR: u64 = 16384;
/// The longest a guest may take, boot to report.
const GUEST_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The static binaries a guest runs.
pub struct GuestBinaries {
    pub agent: PathBuf,
    pub hog: PathBuf,
    pub runner: PathBuf,
}

/// `cargo xtask matrix [--kernel V]...`.
pub fn matrix(bins: &GuestBinaries, names: &[String]) -> anyhow::Result<()> {
    let kernels: Vec<&Kernel> = if names.is_empty() {
        KERNELS.iter().collect()
    } else {
        names
            .iter()
            .map(|n| {
                KERNELS
                    .iter()
                    .find(|k| k.name == n || k.release == n)
                    .with_context(|| {
                        format!(
                            "no kernel {n} in the matrix; known: {}",
                            KERNELS.iter().map(|k| k.name).collect::<Vec<_>>().join(" ")
                        )
                    })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let dir = cache_dir().join("matrix");
    let setup_start = Instant::now();
    let apt = Apt::new(&dir)?;
    let qemu = Qemu::ensure(&dir, &apt)?;
    let busybox = ensure_busybox(&dir, &apt)?;
    let ext4 = ensure_ext4_image(&dir)?;
    eprintln!(
        "xtask: matrix: qemu, busybox and the ext4 image ready ({:.0} s)",
        setup_start.elapsed().as_secs_f64()
    );

    let mut results = Vec::new();
    for kernel in kernels {
        let start = Instant::now();
        let result = run_kernel(kernel, &dir, &apt, &qemu, &busybox, &ext4, bins)
            .unwrap_or_else(|e| GuestResult::failed(kernel, format!("{e:#}")));
        let result = GuestResult {
            secs: start.elapsed().as_secs_f64(),
            ..result
        };
        eprintln!(
            "xtask: matrix: {} done in {:.0} s (boot to report {:.0} s)",
            kernel.release, result.secs, result.guest_secs
        );
        results.push(result);
    }
    print_table(&results);
    let failed: usize = results.iter().map(GuestResult::failures).sum();
    if failed > 0 {
        bail!("{failed} matrix check(s) failed");
    }
    Ok(())
}

/// A private apt configuration: its own sources, lists, cache and (empty) dpkg status.
/// QEMU 10 and every library it needs, unpacked, run through the unpacked dynamic loader.
struct Qemu {
    root: PathBuf,
}

impl Qemu {
    fn ensure(matrix: &Path, apt: &Apt) -> anyhow::Result<Qemu> {
        let debs_dir = matrix.join("qemu-debs");
        let root = matrix.join("qemu");
        let qemu = Qemu { root };
        if qemu.root.join(".npd-unpacked").exists()
            && qemu.version().is_ok_and(|v| v.contains(QEMU_MAJOR))
        {
            return Ok(qemu);
        }
        apt.update()?;
        std::fs::create_dir_all(&debs_dir)?;
        // The whole dependency closure (the status is empty), bookworm's builds pinned first.
        let mut cmd = apt.command("apt-get");
        cmd.args(["-q", "-y", "install", "--download-only"])
            .arg("-o")
            .arg(format!("Dir::Cache::archives={}", debs_dir.display()))
            .arg(format!("{QEMU_PACKAGE}/{QEMU_SUITE}"));
        run(&mut cmd)?;
        let mut debs: Vec<PathBuf> = std::fs::read_dir(&debs_dir)?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        debs.sort();
        unpack(&debs, &qemu.root)?;
        let version = qemu.version()?;
        if !version.contains(QEMU_MAJOR) {
            bail!("expected QEMU {QEMU_MAJOR}x from {QEMU_SUITE}, got: {version}");
        }
        Ok(qemu)
    }

    fn command(&self) -> Command {
        let r = |p: &str| self.root.join(p);
        let mut cmd = Command::new(r("lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"));
        let libs = [r("usr/lib/x86_64-linux-gnu"), r("lib/x86_64-linux-gnu")]
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":");
        cmd.arg("--library-path")
            .arg(libs)
            .arg(r("usr/bin/qemu-system-x86_64"))
            .env("QEMU_MODULE_DIR", r("usr/lib/x86_64-linux-gnu/qemu"))
            .arg("-L")
            .arg(r("usr/share/qemu"))
            .arg("-L")
            .arg(r("usr/share/seabios"));
        cmd
    }

    fn version(&self) -> anyhow::Result<String> {
        let mut cmd = self.command();
        cmd.arg("--version");
        Ok(output(&mut cmd)?
            .lines()
            .next()
            .unwrap_or_default()
            .to_string())
    }
}

/// A 16 MiB ext4 image made by the host's `mkfs.ext4` (busybox makes only ext2), cached.
fn ensure_ext4_image(matrix: &Path) -> anyhow::Result<PathBuf> {
    let image = matrix.join("ext4-16m.img");
    if !image.is_file() {
        let tmp = matrix.join("ext4-16m.img.tmp");
        make_ext4(&tmp, 16)?;
        std::fs::rename(&tmp, &image)?;
    }
    Ok(image)
}

/// A sparse file of `mib` MiB with an ext4 file system on it.
fn make_ext4(path: &Path, mib: u64) -> anyhow::Result<()> {
    let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| crate::which("mkfs.ext4"))
        .context("mkfs.ext4 (e2fsprogs) is needed to make the guest's ext4 file systems")?;
    std::fs::File::create(path)?.set_len(mib << 20)?;
    run(Command::new(mkfs).args(["-q", "-F"]).arg(path))
}

/// An unpacked kernel package.
struct UnpackedKernel {
    root: PathBuf,
    release: &'static str,
}

impl UnpackedKernel {
    fn ensure(kernel: &Kernel, matrix: &Path, apt: &Apt) -> anyhow::Result<UnpackedKernel> {
        let debs = kernel
            .packages
            .iter()
            .map(|(name, version)| {
                apt.download(&format!("{name}={version}"), &matrix.join("debs"))
                    .with_context(|| format!("Linux {} from Debian {}", kernel.name, kernel.suite))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let root = matrix.join("kernels").join(kernel.release);
        unpack(&debs, &root)?;
        Ok(UnpackedKernel {
            root,
            release: kernel.release,
        })
    }

    fn modules_dir(&self) -> anyhow::Result<PathBuf> {
        ["usr/lib/modules", "lib/modules"]
            .iter()
            .map(|d| self.root.join(d).join(self.release))
            .find(|d| d.is_dir())
            .with_context(|| format!("no modules directory for {}", self.release))
    }

    fn vmlinuz(&self) -> anyhow::Result<PathBuf> {
        let candidates = [
            self.root.join(format!("boot/vmlinuz-{}", self.release)),
            self.modules_dir()?.join("vmlinuz"),
        ];
        candidates
            .into_iter()
            .find(|p| p.is_file())
            .with_context(|| format!("no vmlinuz for {}", self.release))
    }

    fn config(&self) -> anyhow::Result<String> {
        let candidates = [
            self.root.join(format!("boot/config-{}", self.release)),
            self.modules_dir()?.join("config"),
        ];
        let path = candidates
            .into_iter()
            .find(|p| p.is_file())
            .with_context(|| format!("no kernel config for {}", self.release))?;
        Ok(std::fs::read_to_string(path)?)
    }

    /// Whether cgroup v1's memory controller is built: `CONFIG_MEMCG_V1` since 6.11, before
    /// that always with `CONFIG_MEMCG`.
    fn memcg_v1(&self) -> anyhow::Result<bool> {
        let config = self.config()?;
        let has = |line: &str| config.lines().any(|l| l.trim() == line);
        Ok(if has("CONFIG_MEMCG_V1=y") {
            true
        } else if has("# CONFIG_MEMCG_V1 is not set") {
            false
        } else {
            has("CONFIG_MEMCG=y")
        })
    }

    /// The module files for `wanted` and their dependencies, in load order (dependencies
    /// first), decompressed. Built-in ones are skipped.
    fn modules(&self, wanted: &[&str], busybox: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let dir = self.modules_dir()?;
        let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        let mut files = Vec::new();
        collect_ko(&dir.join("kernel"), &mut files)?;
        let mut order: Vec<(String, Vec<u8>)> = Vec::new();
        let mut visiting = Vec::new();
        for name in wanted {
            self.add_module(name, &files, &builtin, busybox, &mut order, &mut visiting)?;
        }
        Ok(order)
    }

    fn add_module(
        &self,
        name: &str,
        files: &[PathBuf],
        builtin: &str,
        busybox: &Path,
        order: &mut Vec<(String, Vec<u8>)>,
        visiting: &mut Vec<String>,
    ) -> anyhow::Result<()> {
        let norm = |s: &str| s.replace('-', "_");
        let name = norm(name);
        if order.iter().any(|(n, _)| *n == name) || visiting.contains(&name) {
            return Ok(());
        }
        let file = files.iter().find(|p| {
            let f = p.file_name().unwrap_or_default().to_string_lossy();
            f.split(".ko").next().is_some_and(|stem| norm(stem) == name)
        });
        let Some(file) = file else {
            let is_builtin = builtin.lines().any(|l| {
                Path::new(l)
                    .file_name()
                    .map(|f| f.to_string_lossy())
                    .is_some_and(|f| norm(f.trim_end_matches(".ko")) == name)
            });
            if is_builtin {
                return Ok(());
            }
            bail!(
                "{}: module {name} is neither a module nor built in",
                self.release
            );
        };
        let bytes = decompress(file, busybox)?;
        visiting.push(name.clone());
        for dep in modinfo_depends(&bytes) {
            self.add_module(&dep, files, builtin, busybox, order, visiting)?;
        }
        visiting.retain(|v| *v != name);
        order.push((name, bytes));
        Ok(())
    }
}

fn collect_ko(dir: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            collect_ko(&path, out)?;
        } else if path.to_string_lossy().contains(".ko") {
            out.push(path);
        }
    }
    Ok(())
}

/// A module file's bytes, decompressed (`.ko.xz` and `.ko.gz` with the cached static busybox,
/// `.ko.zst` with zstd).
fn decompress(file: &Path, busybox: &Path) -> anyhow::Result<Vec<u8>> {
    let name = file.to_string_lossy();
    let mut cmd = if name.ends_with(".ko") {
        return std::fs::read(file).with_context(|| format!("reading {name}"));
    } else if name.ends_with(".xz") {
        let mut c = Command::new(busybox);
        c.arg("xzcat");
        c
    } else if name.ends_with(".gz") {
        let mut c = Command::new(busybox);
        c.arg("zcat");
        c
    } else if name.ends_with(".zst") {
        let mut c = Command::new("zstd");
        c.args(["-dc", "-q"]);
        c
    } else {
        bail!("unknown module compression: {name}");
    };
    cmd.arg(file);
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", describe(&cmd)))?;
    if !out.status.success() {
        bail!("{} failed: {}", describe(&cmd), out.status);
    }
    Ok(out.stdout)
}

/// The `depends=` entry of a module's `.modinfo` (NUL-separated `key=value` strings).
fn modinfo_depends(ko: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = ko.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &ko[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// A newc cpio archive (what the kernel unpacks as its initramfs), built in memory.
#[derive(Default)]
struct Cpio {
    data: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, body: &[u8], rdev: (u32, u32)) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            body.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.data.extend_from_slice(header.as_bytes());
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.data.len().is_multiple_of(4) {
            self.data.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[], (0, 0));
    }

    fn file(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.entry(name, 0o100000 | mode, body, (0, 0));
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, &[], (major, minor));
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        while !self.data.len().is_multiple_of(512) {
            self.data.push(0);
        }
        self.data
    }
}

/// The guest's `/init`: busybox, the modules in order, the file systems, then the runner; the
/// machine powers off when the runner is done (also when it failed).
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/bin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tracefs tracefs /sys/kernel/tracing
while read -r module; do
    insmod "/modules/$module.ko" || echo "npd-matrix: insmod $module failed"
done < /modules/order
# The loop module makes /dev/loop0..7; wait for the virtio disk.
for i in 1 2 3 4 5 6 7 8 9 10; do
    [ "$(ls /sys/block | grep -c '^vd')" -ge 2 ] && break
    sleep 1
done
echo "npd-matrix: $(uname -r) up $(cut -d' ' -f1 /proc/uptime) s, starting the runner"
NPD_AGENT_BIN=/bin/npd-agent /bin/npd-matrix-guest /dev/ttyS1 /matrix/guest.json
echo "npd-matrix: runner exited with $?"
sync
poweroff -f
"#;

/// util-linux spellings the shared fault helpers use, on busybox's tools.
const LOSETUP_SHIM: &str = r#"#!/bin/sh
# `losetup --find --show FILE` (util-linux) on busybox's losetup.
if [ "$1" = "--find" ] && [ "$2" = "--show" ]; then
    dev=$(busybox losetup -f) && busybox losetup "$dev" "$3" && echo "$dev"
else
    exec busybox losetup "$@"
fi
"#;
const FSFREEZE_SHIM: &str = r#"#!/bin/sh
# `fsfreeze -f|-u DIR` (util-linux) on busybox's fsfreeze.
case "$1" in
    -f) exec busybox fsfreeze --freeze "$2" ;;
    -u) exec busybox fsfreeze --unfreeze "$2" ;;
    *) exec busybox fsfreeze "$@" ;;
esac
"#;

fn build_initramfs(
    kernel: &Kernel,
    unpacked: &UnpackedKernel,
    busybox: &Path,
    ext4: &Path,
    bins: &GuestBinaries,
) -> anyhow::Result<Vec<u8>> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "usr",
        "usr/local",
        "usr/local/bin",
        "modules",
        "matrix",
        "matrix/formats",
    ] {
        cpio.dir(dir);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("init", 0o755, INIT.as_bytes());
    cpio.file("bin/busybox", 0o755, &read(busybox)?);
    cpio.file("bin/npd-agent", 0o755, &stripped(&bins.agent)?);
    cpio.file("bin/npd-test-hog", 0o755, &stripped(&bins.hog)?);
    cpio.file("bin/npd-matrix-guest", 0o755, &stripped(&bins.runner)?);
    cpio.file("usr/local/bin/losetup", 0o755, LOSETUP_SHIM.as_bytes());
    cpio.file("usr/local/bin/fsfreeze", 0o755, FSFREEZE_SHIM.as_bytes());
    cpio.file("matrix/ext4.img", 0o644, &read(ext4)?);

    let modules = unpacked.modules(MODULES, busybox)?;
    let mut order = String::new();
    for (name, bytes) in &modules {
        cpio.file(&format!("modules/{name}.ko"), 0o644, bytes);
        order.push_str(name);
        order.push('\n');
    }
    cpio.file("modules/order", 0o644, order.as_bytes());

    let formats = formats_dir(kernel);
    let mut block_tracepoint = "block:block_rq_error";
    for entry in
        std::fs::read_dir(&formats).with_context(|| format!("reading {}", formats.display()))?
    {
        let path = entry?.path();
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let body = read(&path)?;
        if name == "block_block_rq_error.format" && body == b"MISSING\n" {
            block_tracepoint = "block:block_rq_complete";
        }
        cpio.file(&format!("matrix/formats/{name}"), 0o644, &body);
    }
    let guest = serde_json::json!({
        "release": kernel.release,
        "formats": "/matrix/formats",
        "formats_name": kernel.release,
        "block_tracepoint": block_tracepoint,
        "memcg_v1": unpacked.memcg_v1()?,
        "faulty_disk_serial": FAULTY_SERIAL,
        "scratch_disk_serial": SCRATCH_SERIAL,
        "read_error_sector": READ_ERROR_SECTOR,
        "write_error_sector": WRITE_ERROR_SECTOR,
    });
    cpio.file("matrix/guest.json", 0o644, guest.to_string().as_bytes());
    Ok(cpio.finish())
}

/// The binary without its debug information (`strip --strip-debug`, binutils), which the guest
/// does not need: the release profile keeps line tables, and they are most of the agent's
/// size. The code is the same bytes.
fn stripped(binary: &Path) -> anyhow::Result<Vec<u8>> {
    let out = std::env::temp_dir().join(format!(
        "npd-matrix-{}-{}",
        std::process::id(),
        binary.file_name().unwrap_or_default().to_string_lossy()
    ));
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(binary))
    .context("strip (binutils) makes the guest's copies smaller")?;
    let bytes = std::fs::read(&out)?;
    let _ = std::fs::remove_file(&out);
    Ok(bytes)
}

fn formats_dir(kernel: &Kernel) -> PathBuf {
    crate::workspace_root()
        .join("npd-agent/testdata/formats")
        .join(kernel.release)
}

/// What one guest reported.
struct GuestResult {
    release: String,
    /// (check, status, detail, seconds)
    checks: Vec<(String, String, String, f64)>,
    /// Problems outside any check (boot, no report).
    errors: Vec<String>,
    secs: f64,
    guest_secs: f64,
}

impl GuestResult {
    fn failed(kernel: &Kernel, error: String) -> GuestResult {
        GuestResult {
            release: kernel.release.to_string(),
            checks: Vec::new(),
            errors: vec![error],
            secs: 0.0,
            guest_secs: 0.0,
        }
    }

    fn failures(&self) -> usize {
        self.errors.len() + self.checks.iter().filter(|c| c.1 == "fail").count()
    }
}

fn run_kernel(
    kernel: &Kernel,
    matrix: &Path,
    apt: &Apt,
    qemu: &Qemu,
    busybox: &Path,
    ext4: &Path,
    bins: &GuestBinaries,
) -> anyhow::Result<GuestResult> {
    let unpacked = UnpackedKernel::ensure(kernel, matrix, apt)?;
    let work = matrix.join("run").join(kernel.release);
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let initramfs = work.join("initramfs.cpio");
    std::fs::write(
        &initramfs,
        build_initramfs(kernel, &unpacked, busybox, ext4, bins)?,
    )?;
    let disk = work.join("faulty.img");
    std::fs::File::create(&disk)?.set_len(32 << 20)?;
    let blkdebug = work.join("blkdebug.conf");
    std::fs::write(
        &blkdebug,
        format!(
            "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\nsector = \"{READ_ERROR_SECTOR}\"\n\n\
             [inject-error]\nevent = \"write_aio\"\nerrno = \"5\"\nsector = \"{WRITE_ERROR_SECTOR}\"\n"
        ),
    )?;
    let scratch = work.join("scratch.img");
    make_ext4(&scratch, 64)?;
    let mut result = boot(kernel, &unpacked, &work, qemu, None)?;
    // cgroup v1's OOM check boots on its own (the guest runner says why).
    if unpacked.memcg_v1()? {
        let v1 = boot(kernel, &unpacked, &work, qemu, Some(MEMCG_V1_BOOT))?;
        result.checks.extend(v1.checks);
        result.errors.extend(v1.errors);
        result.guest_secs += v1.guest_secs;
    }
    Ok(result)
}

/// The kernel command-line word of the boot that runs only the cgroup v1 OOM check (the guest
/// runner's `V1_BOOT_ARG`).
const MEMCG_V1_BOOT: &str = "npd.boot=memcg-v1";

/// One boot of the guest whose files [`run_kernel`] made in `work`, with `extra` on the
/// kernel command line: the checks it reported.
fn boot(
    kernel: &Kernel,
    unpacked: &UnpackedKernel,
    work: &Path,
    qemu: &Qemu,
    extra: Option<&str>,
) -> anyhow::Result<GuestResult> {
    let initramfs = work.join("initramfs.cpio");
    let disk = work.join("faulty.img");
    let blkdebug = work.join("blkdebug.conf");
    let scratch = work.join("scratch.img");
    let suffix = if extra.is_some() { "-memcg-v1" } else { "" };
    let console = work.join(format!("console{suffix}.log"));
    let report = work.join(format!("report{suffix}.jsonl"));
    let append = match extra {
        Some(word) => format!("console=ttyS0 panic=-1 rdinit=/init {word}"),
        None => "console=ttyS0 panic=-1 rdinit=/init".to_owned(),
    };
    let mut cmd = qemu.command();
    cmd.args(["-machine", "q35", "-accel", "tcg,thread=multi", "-smp", "2", "-m", "1024"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(unpacked.vmlinuz()?)
        .arg("-initrd")
        .arg(&initramfs)
        .args(["-append", &append])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", report.display()))
        .arg("-drive")
        .arg(format!(
            "if=none,id=faulty,format=raw,file.driver=blkdebug,file.config={},file.image.driver=file,file.image.filename={}",
            blkdebug.display(),
            disk.display()
        ))
        .args(["-device", &format!("virtio-blk-pci,drive=faulty,serial={FAULTY_SERIAL}")])
        .arg("-drive")
        .arg(format!(
            "if=none,id=scratch,format=raw,file={}",
            scratch.display()
        ))
        .args(["-device", &format!("virtio-blk-pci,drive=scratch,serial={SCRATCH_SERIAL}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    eprintln!(
        "xtask: matrix: booting {}{} ({})",
        kernel.release,
        extra.map(|w| format!(" with {w}")).unwrap_or_default(),
        describe(&cmd)
    );
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", describe(&cmd)))?;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > GUEST_TIMEOUT {
            let _ = child.kill();
            timed_out = true;
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let guest_secs = start.elapsed().as_secs_f64();
    let mut result = GuestResult {
        release: kernel.release.to_string(),
        checks: Vec::new(),
        errors: Vec::new(),
        secs: 0.0,
        guest_secs,
    };
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    let mut done = false;
    for line in text
        .lines()
        .map(|l| l.trim_matches(|c| c == '\r' || c == '\0'))
    {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if v["done"] == true {
            done = true;
        } else if let Some(check) = v["check"].as_str() {
            result.checks.push((
                check.to_string(),
                v["status"].as_str().unwrap_or("fail").to_string(),
                v["detail"].as_str().unwrap_or_default().to_string(),
                v["secs"].as_f64().unwrap_or_default(),
            ));
        }
    }
    if !done {
        let tail: Vec<String> = std::fs::read_to_string(&console)
            .unwrap_or_default()
            .lines()
            .rev()
            .take(15)
            .map(str::to_string)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        result.errors.push(format!(
            "the guest did not finish its report ({}); console {}:\n{}",
            if timed_out {
                format!("killed after {} s", GUEST_TIMEOUT.as_secs())
            } else {
                format!("qemu exited: {status}")
            },
            console.display(),
            tail.join("\n")
        ));
    }
    Ok(result)
}

fn print_table(results: &[GuestResult]) {
    let mut checks: Vec<String> = Vec::new();
    for r in results {
        for c in &r.checks {
            if !checks.contains(&c.0) {
                checks.push(c.0.clone());
            }
        }
    }
    let width = checks.iter().map(String::len).max().unwrap_or(5).max(20);
    let col = results
        .iter()
        .map(|r| r.release.len())
        .max()
        .unwrap_or(8)
        .max(8);
    let mut out = String::new();
    out.push_str(&format!("\n{:width$}", "check"));
    for r in results {
        out.push_str(&format!("  {:col$}", r.release));
    }
    out.push('\n');
    for check in &checks {
        out.push_str(&format!("{check:width$}"));
        for r in results {
            let cell = r
                .checks
                .iter()
                .find(|c| &c.0 == check)
                .map_or("missing".to_string(), |c| format!("{} {:.0}s", c.1, c.3));
            out.push_str(&format!("  {cell:col$}"));
        }
        out.push('\n');
    }
    out.push_str(&format!("{:width$}", "time (boot to report)"));
    for r in results {
        out.push_str(&format!("  {:col$}", format!("{:.0} s", r.guest_secs)));
    }
    out.push('\n');
    out.push_str(&format!("{:width$}", "time (with setup)"));
    for r in results {
        out.push_str(&format!("  {:col$}", format!("{:.0} s", r.secs)));
    }
    out.push_str("\n\nreasons:\n");
    for r in results {
        for e in &r.errors {
            out.push_str(&format!("{}: FAIL: {e}\n", r.release));
        }
        for (check, status, detail, _) in &r.checks {
            out.push_str(&format!("{} / {check}: {status}: {detail}\n", r.release));
        }
    }
    let passed: usize = results
        .iter()
        .map(|r| r.checks.iter().filter(|c| c.1 == "pass").count())
        .sum();
    let na: usize = results
        .iter()
        .map(|r| r.checks.iter().filter(|c| c.1 == "n/a").count())
        .sum();
    let failed: usize = results.iter().map(GuestResult::failures).sum();
    out.push_str(&format!(
        "\nmatrix: {passed} passed, {failed} failed, {na} skipped\n"
    ));
    print!("{out}");
    let _ = std::io::stdout().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_doc_names_every_kernel_package_by_version() {
        let doc = std::fs::read_to_string(crate::workspace_root().join("docs/kernel-matrix.md"))
            .expect("docs/kernel-matrix.md");
        for kernel in KERNELS {
            for (name, version) in kernel.packages {
                assert!(
                    doc.contains(&format!("`{name}` | `{version}`")),
                    "docs/kernel-matrix.md lacks the row `{name}` | `{version}`"
                );
            }
            assert!(
                formats_dir(kernel).is_dir(),
                "no testdata formats for {}",
                kernel.release
            );
        }
    }

    #[test]
    fn modinfo_depends_is_read() {
        let ko = b"\x7fELF....\0license=GPL\0depends=virtio,virtio_ring\0retpoline=Y\0";
        assert_eq!(modinfo_depends(ko), ["virtio", "virtio_ring"]);
        assert!(modinfo_depends(b"\0depends=\0").is_empty());
        assert!(modinfo_depends(b"nothing").is_empty());
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let data = cpio.finish();
        assert!(data.starts_with(b"070701"));
        assert_eq!(data.len() % 512, 0);
        let trailer = data.windows(10).position(|w| w == b"TRAILER!!!");
        assert!(trailer.is_some());
    }
}
