//! `cargo xtask`: everything a newcomer needs, on a fresh machine.
//!
//! * `setup`: installs what is missing, idempotently: the nightly toolchain's `rust-src` and
//!   `bpf-linker` built against the nightly's own LLVM (kept outside the checkout, in
//!   `$NPD_CACHE` or `~/.cache/npd`, keyed by the nightly's commit so it is rebuilt when the
//!   nightly changes).
//! * `build`: setup, then the agent (release, with its eBPF programs embedded).
//! * `run [-- ARGS]`: build, then run the agent as root (through sudo when not root).
//! * `test`: setup, then every unit and integration test; the integration tests need root
//!   (through sudo when not root) and run one at a time.
//! * `bench [NAME]`: setup, then the benchmarks (criterion, then as root the kernel sensor,
//!   the performance table, the plugin monitor and the OOM storm soak); `bench perf` prints
//!   only the performance table and writes `target/bench/perf.json`.
//! * `fuzz [--seconds N] [TARGET...]`: runs the fuzz targets in `fuzz/` (cargo-fuzz and
//!   libFuzzer on the nightly toolchain, with AddressSanitizer), each for N seconds, and prints
//!   the executions and findings of each. The corpus grows in the cache, outside the checkout.
//! * `build --static`: the static (musl) release agent, as shipped in the image.
//! * `image [--rootfs DIR]`: the OCI image (podman, no Docker daemon, nothing pulled), written
//!   to `target/npd-image.oci.tar` and kept in local podman storage as `localhost/npd:VERSION`.
//! * `matrix [--kernel V]...`: the static build on Debian's kernels under qemu, real faults in
//!   each guest (`docs/kernel-matrix.md`).
//! * `manifests`: renders `deploy/kubernetes/` from the Helm chart `deploy/helm/npd` and
//!   refreshes the chart's copy of `config/*.json` (`deploy/helm/render-manifests.sh`, with the
//!   pinned helm it installs into the cache).

mod debian;
mod image;
mod matrix;
mod static_build;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

/// The bpf-linker release known to work with aya 0.14 and LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// The cargo-fuzz release `cargo xtask fuzz` installs (into the cache).
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// The fuzz targets in `fuzz/fuzz_targets`.
const FUZZ_TARGETS: [&str; 6] = [
    "replay",
    "rule_file",
    "plugin_config",
    "tracepoint_record",
    "kmsg_record",
    "pod_attribution",
];

#[derive(Parser)]
#[command(name = "cargo xtask", about = "npd developer commands")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building npd needs (idempotent).
    Setup {
        /// Only print the PATH that puts bpf-linker first (for scripts).
        #[arg(long)]
        print_path: bool,
    },
    /// Build the agent (release).
    Build {
        /// Statically linked (musl), as shipped in the image:
        /// target/x86_64-unknown-linux-musl/release/npd-agent.
        #[arg(long = "static")]
        static_: bool,
    },
    /// Build and run the agent as root; arguments after `--` go to the agent.
    Run {
        /// Arguments for `npd-agent`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run all tests: unit tests, then integration tests as root, one at a time.
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
    },
    /// Run the benchmarks and print their numbers.
    Bench {
        /// Only this benchmark of the tests crate (`sensor`, `perf`, `plugins`, `pods`, `oom_storm`);
        /// `perf` prints the performance table and writes target/bench/perf.json.
        only: Option<String>,
    },
    /// Fuzz the parsers of hostile input; each target for `--seconds`.
    Fuzz {
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Targets to run (default: all).
        targets: Vec<String>,
    },
    /// Build the OCI image (podman; no Docker daemon, nothing pulled from a registry).
    Image {
        /// Only assemble the image's root file system in this directory.
        #[arg(long, value_name = "DIR")]
        rootfs: Option<PathBuf>,
    },
    /// Boot Debian's kernels under qemu and run real faults against the static agent in each.
    Matrix {
        /// Only this kernel (5.10, 6.1, 6.12, 7.2); repeatable. Default: all.
        #[arg(long = "kernel", value_name = "V")]
        kernels: Vec<String>,
    },
    /// Render deploy/kubernetes/ from the Helm chart deploy/helm/npd.
    Manifests,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root).with_context(|| format!("cd {}", root.display()))?;
    match cli.command {
        Cmd::Setup { print_path } => {
            let path = setup()?;
            if print_path {
                println!("{}", path.to_string_lossy());
            }
            Ok(())
        }
        Cmd::Build { static_ } => {
            let path = setup()?;
            if static_ {
                let agent = static_build::build_static_agent(&path)?;
                println!("{}", agent.display());
                return Ok(());
            }
            build_agent(&path, true).map(drop)
        }
        Cmd::Matrix { kernels } => {
            let path = setup()?;
            let mut bins = static_build::build_static(
                &path,
                &[
                    ("npd-agent", "npd-agent"),
                    ("npd-tests", "npd-test-hog"),
                    ("npd-tests", "npd-matrix-guest"),
                ],
            )?
            .into_iter();
            let mut next = || bins.next().context("missing binary");
            let bins = matrix::GuestBinaries {
                agent: next()?,
                hog: next()?,
                runner: next()?,
            };
            for bin in [&bins.agent, &bins.hog, &bins.runner] {
                static_build::check_static(bin)?;
            }
            matrix::matrix(&bins, &kernels)
        }
        Cmd::Run { args } => {
            let path = setup()?;
            let agent = build_agent(&path, true)?;
            let mut cmd = as_root(&agent)?;
            cmd.args(args);
            // The agent's exit code is the command's.
            let status = cmd
                .status()
                .with_context(|| format!("running {}", agent.display()))?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Test { filter } => {
            let path = setup()?;
            test(&path, filter)
        }
        Cmd::Bench { only } => {
            let path = setup()?;
            bench(&path, only.as_deref())
        }
        Cmd::Image { rootfs } => {
            let path = setup()?;
            image::image(&path, &root, rootfs)
        }
        Cmd::Fuzz { seconds, targets } => {
            let path = setup()?;
            fuzz(&path, seconds, &targets)
        }
        Cmd::Manifests => run(&mut Command::new(
            root.join("deploy/helm/render-manifests.sh"),
        )),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A command that runs `program` as root: directly when we are root, else through `sudo -E`.
fn as_root(program: &Path) -> anyhow::Result<Command> {
    if is_root() {
        return Ok(Command::new(program));
    }
    if which("sudo").is_none() {
        bail!("npd needs root (eBPF, tracefs, /dev/kmsg) and sudo is not installed");
    }
    let mut cmd = Command::new("sudo");
    cmd.arg("-E").arg(program);
    Ok(cmd)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed: {status}", describe(cmd));
    }
    Ok(())
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("starting {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}: {}",
            describe(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("NPD_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("npd");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/npd")
}

/// Installs the nightly's rust-src and bpf-linker when missing; returns PATH with bpf-linker
/// first.
fn setup() -> anyhow::Result<OsString> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("the eBPF programs need a nightly toolchain")?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let field = |name: &str| {
        version
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .with_context(|| format!("`rustc +nightly -vV` has no `{name}` line"))
    };
    let commit = field("commit-hash:")?;
    let llvm_major = field("LLVM version:")?
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    let dir = cache_dir().join(format!("bpf-linker-{}", &commit[..commit.len().min(12)]));
    let linker = dir.join("bin/bpf-linker");
    let works = linker.is_file()
        && Command::new(&linker)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    if !works {
        install_bpf_linker(&dir, &llvm_major)?;
    }

    let mut paths = vec![dir.join("bin")];
    if let Some(existing) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&existing));
    }
    Ok(std::env::join_paths(paths)?)
}

/// Builds bpf-linker against the LLVM library the nightly toolchain ships (no LLVM package of
/// that version exists for Debian 12), as `docs/kernel.md` describes.
fn install_bpf_linker(dir: &Path, llvm_major: &str) -> anyhow::Result<()> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = Path::new(sysroot.trim()).join("lib");
    let llvm_lib = std::fs::read_dir(&libdir)
        .with_context(|| format!("reading {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| {
            name.starts_with("libLLVM.so.")
                || (name.starts_with("libLLVM-") && name.ends_with(".so"))
        })
        .with_context(|| format!("no libLLVM in {}", libdir.display()))?;
    let prefix = dir.join("llvm");
    let prefix_lib = prefix.join("lib");
    std::fs::create_dir_all(&prefix_lib)
        .with_context(|| format!("creating {}", prefix_lib.display()))?;
    for link in [llvm_lib.as_str(), "libLLVM.so"] {
        let path = prefix_lib.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(libdir.join(&llvm_lib), &path)
            .with_context(|| format!("linking {}", path.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_major} (a few minutes, once)"
    );
    run(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .arg("--root")
        .arg(dir)
        .env("LLVM_PREFIX", &prefix)
        // Build outside the checkout so the workspace's config does not apply.
        .current_dir(std::env::temp_dir()))
}

/// `--locked` in CI, so the committed Cargo.lock is what gets built.
fn locked() -> &'static [&'static str] {
    if in_ci() { &["--locked"] } else { &[] }
}

fn cargo(path: &OsString) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env("PATH", path);
    cmd
}

/// Builds the agent and returns the executable cargo built (not a path guessed from the
/// target directory: the tests run exactly the binary this command produced).
fn build_agent(path: &OsString, release: bool) -> anyhow::Result<PathBuf> {
    let mut cmd = cargo(path);
    cmd.args([
        "build",
        "--package",
        "npd-agent",
        "--bins",
        "--message-format=json-render-diagnostics",
    ])
    .args(locked());
    if release {
        cmd.arg("--release");
    }
    eprintln!("xtask: {}", describe(&cmd));
    // Progress and diagnostics on stderr, as usual; the artifact messages on stdout.
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting {}", describe(&cmd)))?;
    if !out.status.success() {
        bail!("{} failed: {}", describe(&cmd), out.status);
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "npd-agent")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo reported no npd-agent executable")
}

/// `CI=true` (or `1`, `yes`), as the tests crate's strict mode reads it: `CI=false` is not CI.
fn in_ci() -> bool {
    std::env::var("CI")
        .is_ok_and(|v| ["true", "1", "yes"].contains(&v.trim().to_ascii_lowercase().as_str()))
}

/// Totals of a test run, from libtest's `test result:` lines and the skip log.
#[derive(Debug, Default, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    skipped: u64,
}

impl Totals {
    /// Adds one `test result: ok. 82 passed; 0 failed; 0 ignored; ...` line.
    fn add_result_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }

    /// Counts the skip log's tests: each returned early, which libtest counted as passed.
    fn count_skips(&mut self, skipped: &[String]) {
        self.skipped = skipped.len() as u64;
        self.passed = self.passed.saturating_sub(self.skipped);
    }
}

fn test(path: &OsString, filter: Option<String>) -> anyhow::Result<()> {
    let agent = build_agent(path, false)?;
    // The image the container tests run: the one this command just built.
    image::image(path, &workspace_root(), None)?;
    let skip_log = std::env::temp_dir().join(format!("npd-skipped-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&skip_log);
    let mut cmd = cargo(path);
    // The default members: every crate but the eBPF one, which only builds for the BPF target.
    // Every test binary runs, even after a failure, so that the totals are complete.
    cmd.args(["test", "--no-fail-fast"]).args(locked());
    cmd.env("NPD_AGENT_BIN", &agent);
    cmd.env("NPD_IMAGE", image::image_name());
    cmd.env("NPD_SKIP_LOG", &skip_log);
    if !is_root() {
        if which("sudo").is_none() {
            bail!(
                "the integration tests need root (eBPF, kernel faults) and sudo is not installed"
            );
        }
        // Test binaries run through sudo; cargo itself (and target/) stay the user's.
        cmd.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    // Integration tests share kernel state: one at a time.
    cmd.arg("--");
    if let Some(filter) = filter {
        cmd.arg(filter);
    }
    cmd.arg("--test-threads=1");
    eprintln!("xtask: {}", describe(&cmd));
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", describe(&cmd)))?;
    let mut totals = Totals::default();
    let stdout = child.stdout.take().context("piped stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.context("reading the test output")?;
        println!("{line}");
        totals.add_result_line(&line);
    }
    let status = child.wait()?;
    let skipped: Vec<String> = std::fs::read_to_string(&skip_log)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    let _ = std::fs::remove_file(&skip_log);
    for s in &skipped {
        eprintln!("xtask: skipped {s}");
    }
    totals.count_skips(&skipped);
    println!(
        "{} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.skipped
    );
    if !status.success() {
        bail!("{} failed: {status}", describe(&cmd));
    }
    no_skips_in_ci(&skipped, in_ci())
}

/// In CI a skipped test fails the run: a missing prerequisite is a failure there.
fn no_skips_in_ci(skipped: &[String], ci: bool) -> anyhow::Result<()> {
    if ci && !skipped.is_empty() {
        bail!("in CI no test may be skipped: {}", skipped.join("; "));
    }
    Ok(())
}

/// The benchmarks of the tests crate, in the order `cargo xtask bench` runs them.
const TEST_BENCHES: [&str; 5] = ["sensor", "perf", "plugins", "pods", "oom_storm"];

fn bench(path: &OsString, only: Option<&str>) -> anyhow::Result<()> {
    if let Some(name) = only
        && !TEST_BENCHES.contains(&name)
    {
        bail!("no benchmark {name:?}: one of {}", TEST_BENCHES.join(", "));
    }
    let agent = build_agent(path, true)?;
    if only.is_none() {
        let mut criterion = cargo(path);
        criterion
            .args(["bench", "--package", "npd-agent"])
            .args(locked());
        run(&mut criterion)?;
    }
    // The kernel sensor, the performance table (floods, Event writes, printk cost, RSS,
    // condition latency through a real API server), the plugin monitor (10 minutes), pod
    // attribution's cost, then the OOM storm soak.
    for bench in TEST_BENCHES
        .iter()
        .filter(|b| only.is_none_or(|o| o == **b))
    {
        let mut kernel = cargo(path);
        kernel
            .args(["bench", "--package", "npd-tests", "--bench", bench])
            .args(locked());
        kernel.env("NPD_AGENT_BIN", &agent);
        if !is_root() {
            kernel.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
        }
        run(&mut kernel)?;
    }
    Ok(())
}

/// Installs cargo-fuzz into the cache when missing; returns PATH with it first.
fn cargo_fuzz(path: &OsString) -> anyhow::Result<OsString> {
    let dir = cache_dir().join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    if !dir.join("bin/cargo-fuzz").is_file() {
        run(cargo(path)
            .args(["install", "cargo-fuzz", "--locked", "--version"])
            .arg(CARGO_FUZZ_VERSION)
            .arg("--root")
            .arg(&dir)
            .current_dir(std::env::temp_dir()))?;
    }
    let mut paths = vec![dir.join("bin")];
    paths.extend(std::env::split_paths(path));
    Ok(std::env::join_paths(paths)?)
}

/// What one fuzz run did, from libFuzzer's final statistics.
#[derive(Debug, Default, PartialEq, Eq)]
struct FuzzStats {
    executions: u64,
    corpus: u64,
}

impl FuzzStats {
    /// Reads `stat::number_of_executed_units: N` and the last `corp: N/...` of libFuzzer's
    /// output.
    fn from_output(text: &str) -> Self {
        let mut stats = FuzzStats::default();
        for line in text.lines() {
            if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
                stats.executions = n.trim().parse().unwrap_or(0);
            }
            if let Some(rest) = line.split(" corp: ").nth(1)
                && let Some(n) = rest.split('/').next()
            {
                stats.corpus = n.trim().parse().unwrap_or(stats.corpus);
            }
        }
        stats
    }
}

/// Runs each fuzz target for `seconds` (libFuzzer, AddressSanitizer, debug assertions on, so
/// an arithmetic overflow is a finding too). A finding stops that target, is saved under
/// `fuzz/artifacts/<target>/`, and fails the command after the others ran.
fn fuzz(path: &OsString, seconds: u64, only: &[String]) -> anyhow::Result<()> {
    for t in only {
        if !FUZZ_TARGETS.contains(&t.as_str()) {
            bail!(
                "unknown fuzz target {t:?}; the targets: {}",
                FUZZ_TARGETS.join(", ")
            );
        }
    }
    let targets: Vec<&str> = if only.is_empty() {
        FUZZ_TARGETS.to_vec()
    } else {
        only.iter().map(String::as_str).collect()
    };
    let path = cargo_fuzz(path)?;
    let fuzz_cargo = || {
        let mut cmd = Command::new("cargo");
        cmd.env("PATH", &path)
            // The fuzz targets use the agent's parsers, not its eBPF programs.
            .env("AYA_BUILD_SKIP", "1")
            .args(["+nightly", "fuzz"]);
        cmd
    };
    run(fuzz_cargo().args(["build", "--fuzz-dir", "fuzz"]))?;
    let mut failed = Vec::new();
    let mut table = Vec::new();
    for target in targets {
        let corpus = cache_dir().join("fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)
            .with_context(|| format!("creating {}", corpus.display()))?;
        let mut cmd = fuzz_cargo();
        cmd.args(["run", "--fuzz-dir", "fuzz", target]).arg(&corpus);
        // Seeds, read but never written: the shipped rule files, or a few committed inputs.
        let seeds = match target {
            "rule_file" => PathBuf::from("config"),
            _ => Path::new("fuzz/seeds").join(target),
        };
        if seeds.is_dir() {
            cmd.arg(seeds);
        }
        cmd.arg("--").args([
            format!("-max_total_time={seconds}"),
            "-timeout=10".into(),
            "-rss_limit_mb=4096".into(),
            "-print_final_stats=1".into(),
        ]);
        eprintln!("xtask: {}", describe(&cmd));
        let out = cmd
            .stdout(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("starting {}", describe(&cmd)))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stats = FuzzStats::from_output(&stderr);
        let verdict = if out.status.success() {
            "no finding".to_string()
        } else {
            eprintln!("{stderr}");
            failed.push(target);
            format!("FINDING (fuzz/artifacts/{target}/)")
        };
        table.push(format!(
            "{target:<18} {seconds:>5} s {:>12} executions {:>6} corpus  {verdict}",
            stats.executions, stats.corpus
        ));
    }
    for row in &table {
        println!("fuzz: {row}");
    }
    if !failed.is_empty() {
        bail!("fuzz targets with findings: {}", failed.join(", "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_are_not_passes_and_fail_a_ci_run() {
        let mut t = Totals::default();
        t.add_result_line("test result: ok. 10 passed; 0 failed; 0 ignored");
        let skipped = vec!["a: no root".to_owned(), "b: no API server".to_owned()];
        t.count_skips(&skipped);
        assert_eq!(
            t,
            Totals {
                passed: 8,
                failed: 0,
                skipped: 2
            }
        );
        let err = no_skips_in_ci(&skipped, true).expect_err("skips fail CI");
        assert!(
            err.to_string().contains("a: no root; b: no API server"),
            "{err}"
        );
        assert!(no_skips_in_ci(&skipped, false).is_ok());
        assert!(no_skips_in_ci(&[], true).is_ok());
    }

    #[test]
    fn totals_from_libtest_lines() {
        let mut t = Totals::default();
        for line in [
            "test result: ok. 82 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 3.23s",
            "running 6 tests",
            "test result: FAILED. 5 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.0s",
            "test a_test_named_test_result ... ok",
        ] {
            t.add_result_line(line);
        }
        assert_eq!(
            t,
            Totals {
                passed: 87,
                failed: 1,
                skipped: 0
            }
        );
    }

    #[test]
    fn fuzz_stats_from_libfuzzer_output() {
        let text = "#2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                    #4096\tpulse  cov: 20 ft: 30 corp: 7/90b lim: 43 exec/s: 2048 rss: 31Mb\n\
                    Done 5000 runs in 2 second(s)\n\
                    stat::number_of_executed_units: 5000\n\
                    stat::peak_rss_mb: 31\n";
        assert_eq!(
            FuzzStats::from_output(text),
            FuzzStats {
                executions: 5000,
                corpus: 7
            }
        );
    }
}
