//! Real kernel faults, each behind a guard that puts the kernel back as it was when dropped
//! (also when the test panics). Recipes: `docs/kernel.md`.

use std::{
    fs::OpenOptions,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// Runs a command and returns its stdout; panics with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Writes one line to /dev/kmsg through a fresh descriptor (the default rate limit is per
/// descriptor: 10 lines per 5 s), newline-terminated as `echo` does: the kernel keeps a record
/// without a newline open for continuation, and `/dev/kmsg` readers see it only once the next
/// message arrives (the eBPF source sees it at once).
pub fn write_kmsg(line: &str) {
    let line = format!("{line}\n");
    let mut f = OpenOptions::new()
        .write(true)
        .open("/dev/kmsg")
        .unwrap_or_else(|e| panic!("opening /dev/kmsg: {e}"));
    f.write_all(line.as_bytes())
        .unwrap_or_else(|e| panic!("writing to /dev/kmsg: {e}"));
}

/// A sysctl (a file under /proc/sys) set for the test, restored on drop.
pub struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    /// Sets `/proc/sys/<name>` (e.g. `kernel/printk_devkmsg`) to `value`.
    pub fn set(name: &str, value: &str) -> Sysctl {
        let path = Path::new("/proc/sys").join(name);
        let old = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
            .trim()
            .to_string();
        // Some handlers (printk_devkmsg) want the newline.
        std::fs::write(&path, format!("{value}\n"))
            .unwrap_or_else(|e| panic!("setting {} to {value}: {e}", path.display()));
        Sysctl { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, format!("{}\n", self.old)) {
            eprintln!(
                "WARNING: could not restore {} to {}: {e}",
                self.path.display(),
                self.old
            );
        }
    }
}

/// A temporary directory, removed (with its content) on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// Creates a fresh directory under /tmp.
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(crate::unique(prefix));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates a file of `mib` MiB (sparse).
pub fn sized_file(path: &Path, mib: u64) {
    let f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    f.set_len(mib << 20)
        .unwrap_or_else(|e| panic!("sizing {}: {e}", path.display()));
}

/// A loop device attached to a file, detached on drop.
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: String,
}

impl LoopDevice {
    /// Attaches `file` to a free loop device.
    pub fn attach(file: &Path) -> LoopDevice {
        let path = run("losetup", &["--find", "--show", &file.to_string_lossy()])
            .trim()
            .to_string();
        LoopDevice { path }
    }

    /// The kernel name (`loopN`).
    pub fn name(&self) -> &str {
        self.path.trim_start_matches("/dev/")
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

/// A mounted file system, unmounted on drop.
pub struct Mount(pub PathBuf);

impl Mount {
    /// Mounts `device` on `dir`.
    pub fn new(device: &str, dir: &Path) -> Mount {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        run("mount", &[device, &dir.to_string_lossy()]);
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    /// Unmounts; a process still finishing a write there (a thawed writer) gets up to 5 s,
    /// then the mount is detached lazily.
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("umount")
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A frozen file system (`fsfreeze -f`), thawed on drop.
pub struct Frozen(PathBuf);

impl Frozen {
    /// Freezes the file system mounted at `dir`.
    pub fn new(dir: &Path) -> Frozen {
        run("fsfreeze", &["-f", &dir.to_string_lossy()]);
        Frozen(dir.to_path_buf())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // Already thawed is fine (a test may have thawed it to finish cleanly).
        let _ = Command::new("fsfreeze")
            .args(["-u", &self.0.to_string_lossy()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// A child process, killed and reaped on drop.
#[derive(Default)]
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map(Child::id).expect("no child")
    }

    /// Waits for the child to exit (`timeout` at most) and returns its status.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let child = self.0.as_mut().expect("no child");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for child") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "child {} still running after {timeout:?}",
                child.id()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts `npd-test-hog` (prepared in `cmd`: its path is `env!("CARGO_BIN_EXE_npd-test-hog")`
/// in this crate's integration tests) and waits until it says it is about to misbehave.
pub fn start_hog(cmd: &mut Command) -> ChildGuard {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting npd-test-hog");
    let stdout = child.stdout.take().expect("piped");
    // Guarded before reading, so a hog that never says `ready` is still killed.
    let guard = ChildGuard(Some(child));
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading npd-test-hog");
    assert_eq!(line.trim(), "ready", "npd-test-hog did not start");
    guard
}

/// A memory cgroup for a test, on cgroup v2 when the host's unified hierarchy has the memory
/// controller (Debian 12's default), else on cgroup v1's memory controller. Dropping it kills
/// the tasks left in it and removes every directory it created (deepest first), and takes
/// `+memory` back out of the `cgroup.subtree_control` of the existing directories where it had
/// to put it.
pub struct MemCgroup {
    /// The cgroup's directory (under [`CGROUP_V2_ROOT`] or [`MEMCG_V1_ROOT`]).
    pub dir: PathBuf,
    /// The controller's root directory.
    root: PathBuf,
    /// The directories created for it, parents first (`dir` last).
    created: Vec<PathBuf>,
    /// Existing directories whose `cgroup.subtree_control` got `+memory` (v2), parents first.
    enabled: Vec<PathBuf>,
}

/// Where cgroup v1's memory controller is mounted.
pub const MEMCG_V1_ROOT: &str = "/sys/fs/cgroup/memory";
/// Where the unified (v2) hierarchy is mounted.
pub const CGROUP_V2_ROOT: &str = "/sys/fs/cgroup";

/// Which memory controller this host offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryController {
    /// cgroup v2: `memory` in `/sys/fs/cgroup/cgroup.controllers`.
    V2,
    /// cgroup v1: `/sys/fs/cgroup/memory`.
    V1,
}

impl MemoryController {
    /// The host's memory controller, v2 first; `Err` says why there is none.
    pub fn detect() -> Result<Self, String> {
        let v2 = Path::new(CGROUP_V2_ROOT).join("cgroup.controllers");
        if std::fs::read_to_string(&v2).is_ok_and(|c| c.split_whitespace().any(|c| c == "memory")) {
            return Ok(MemoryController::V2);
        }
        if Path::new(MEMCG_V1_ROOT)
            .join("memory.limit_in_bytes")
            .exists()
        {
            return Ok(MemoryController::V1);
        }
        Err(format!(
            "no memory cgroup controller: neither `memory` in {} nor {MEMCG_V1_ROOT}",
            v2.display()
        ))
    }
}

impl MemCgroup {
    /// Creates a fresh child cgroup of the root limited to `mib` MiB of memory (and no swap
    /// beyond it).
    pub fn new(mib: u64) -> MemCgroup {
        MemCgroup::at(Path::new(&crate::unique("npd-test")), Some(mib))
    }

    /// Creates the cgroup at `relative` below the memory controller's root (e.g.
    /// `kubepods/burstable/pod<uid>/<container-id>`, as kubelet lays pods out), with the
    /// missing parents; limited to `limit_mib` MiB of memory (and no swap beyond it) when
    /// given. The cgroup itself must not exist yet.
    pub fn at(relative: &Path, limit_mib: Option<u64>) -> MemCgroup {
        let controller = MemoryController::detect().unwrap_or_else(|e| panic!("{e}"));
        let root = PathBuf::from(match controller {
            MemoryController::V2 => CGROUP_V2_ROOT,
            MemoryController::V1 => MEMCG_V1_ROOT,
        });
        assert!(
            relative.is_relative() && relative.components().count() > 0,
            "a cgroup path relative to the controller's root: {}",
            relative.display()
        );
        // Constructed first, so that what was done is undone if a later step panics.
        let mut guard = MemCgroup {
            dir: root.join(relative),
            root: root.clone(),
            created: Vec::new(),
            enabled: Vec::new(),
        };
        let levels: Vec<_> = relative.components().collect();
        let mut parent = root;
        for (i, level) in levels.iter().enumerate() {
            if controller == MemoryController::V2 {
                // Children get the memory controller from their parent's subtree_control.
                let control = parent.join("cgroup.subtree_control");
                let enabled = std::fs::read_to_string(&control).unwrap_or_default();
                if !enabled.split_whitespace().any(|c| c == "memory") {
                    std::fs::write(&control, "+memory").unwrap_or_else(|e| {
                        panic!("enabling memory in {}: {e}", control.display())
                    });
                    if !guard.created.contains(&parent) {
                        guard.enabled.push(parent.clone());
                    }
                }
            }
            let dir = parent.join(level);
            let leaf = i + 1 == levels.len();
            if leaf || !dir.is_dir() {
                std::fs::create_dir(&dir)
                    .unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
                guard.created.push(dir.clone());
            }
            parent = dir;
        }
        if let Some(mib) = limit_mib {
            guard.limit(controller, mib);
        }
        guard
    }

    /// Limits it to `mib` MiB of memory, and no swap beyond it.
    fn limit(&self, controller: MemoryController, mib: u64) {
        let limit = (mib << 20).to_string();
        let (limit_file, swap_file, swap_value) = match controller {
            MemoryController::V2 => ("memory.max", "memory.swap.max", "0".to_string()),
            MemoryController::V1 => (
                "memory.limit_in_bytes",
                "memory.memsw.limit_in_bytes",
                limit.clone(),
            ),
        };
        std::fs::write(self.dir.join(limit_file), &limit)
            .unwrap_or_else(|e| panic!("setting {limit_file}: {e}"));
        // Without swap accounting the file is absent; the limit above is enough then.
        let swap = self.dir.join(swap_file);
        if swap.exists() {
            std::fs::write(&swap, &swap_value)
                .unwrap_or_else(|e| panic!("setting {swap_file}: {e}"));
        }
    }

    /// Its path as the kernel names it (`/proc/<pid>/cgroup`): from the controller's root,
    /// with a leading `/` (`/kubepods/burstable/pod<uid>/<container-id>`).
    pub fn kernel_path(&self) -> String {
        let relative = self.dir.strip_prefix(&self.root).expect("below the root");
        format!("/{}", relative.display())
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        for dir in self.created.iter().rev() {
            // Kill anything left in it, then remove it (rmdir fails while tasks remain).
            if let Ok(pids) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    // SAFETY: signalling a process the test put into its own cgroup.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while let Err(e) = std::fs::remove_dir(dir) {
                if Instant::now() >= deadline {
                    eprintln!("WARNING: could not remove cgroup {}: {e}", dir.display());
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for dir in self.enabled.iter().rev() {
            let control = dir.join("cgroup.subtree_control");
            if let Err(e) = std::fs::write(&control, "-memory") {
                eprintln!("WARNING: could not restore {}: {e}", control.display());
            }
        }
    }
}
