//! The real kernel faults the tests make happen, each leaving the kernel as it found it (the
//! guards in [`crate::kernel`] undo every step, also when a test panics).

use std::{os::unix::process::ExitStatusExt as _, path::Path, process::Command, time::Duration};

use crate::kernel::{
    ChildGuard, Frozen, LoopDevice, MemCgroup, Mount, Sysctl, TempDir, run, sized_file, start_hog,
};

const WAIT: Duration = Duration::from_secs(30);

/// Starts `npd-test-hog` (path given by the test: `env!("CARGO_BIN_EXE_npd-test-hog")`) with
/// `args`, once it says it is about to misbehave.
fn hog(hog: &Path, args: &[&str]) -> ChildGuard {
    start_hog(Command::new(hog).args(args))
}

/// Makes the OOM killer of a fresh 32 MiB memory cgroup kill a hog that allocates 200 MiB.
/// Returns the victim's pid once it is dead.
pub fn oom_kill(hog_path: &Path) -> u32 {
    oom_kill_in(hog_path, &MemCgroup::new(32))
}

/// Makes the OOM killer of `cgroup` (limited to less than 200 MiB: [`MemCgroup::at`]) kill a
/// hog that joins it and allocates 200 MiB. Returns the victim's pid once it is dead.
pub fn oom_kill_in(hog_path: &Path, cgroup: &MemCgroup) -> u32 {
    let mut victim = hog(hog_path, &["oom", &cgroup.dir.to_string_lossy(), "200"]);
    let pid = victim.pid();
    let status = victim.wait(WAIT);
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the hog was not OOM-killed: {status}"
    );
    pid
}

/// A writer stuck in D state on a frozen, loop-mounted ext4, with the hung-task detector set
/// to 2 s. Dropping it restores the sysctls, thaws, reaps the writer, unmounts and detaches.
pub struct HungWriter {
    // Fields drop in declaration order: sysctls, thaw, writer, mount, loop device, files.
    _timeout: Sysctl,
    _warnings: Sysctl,
    _frozen: Frozen,
    writer: ChildGuard,
    _mount: Mount,
    _dev: LoopDevice,
    _dir: TempDir,
}

impl HungWriter {
    /// Starts it; `warnings` is `kernel.hung_task_warnings` (0: the kernel prints nothing).
    pub fn start(hog_path: &Path, warnings: &str) -> HungWriter {
        Self::start_in(hog_path, warnings, None)
    }

    /// [`HungWriter::start`] with the writer in `cgroup` (a directory of a cgroup hierarchy,
    /// e.g. [`MemCgroup::dir`]) before it writes. The caller keeps the cgroup until this is
    /// dropped (declared before it), so that the writer is reaped first.
    pub fn start_in(hog_path: &Path, warnings: &str, cgroup: Option<&Path>) -> HungWriter {
        let dir = TempDir::new("npd-hung");
        let image = dir.join("fs.img");
        sized_file(&image, 32);
        run("mkfs.ext4", &["-q", "-F", &image.to_string_lossy()]);
        let dev = LoopDevice::attach(&image);
        let mount = Mount::new(&dev.path, &dir.join("mnt"));
        let frozen = Frozen::new(&mount.0);
        let file = mount.0.join("file").to_string_lossy().into_owned();
        let cgroup = cgroup.map(|c| c.to_string_lossy().into_owned());
        let mut args = vec!["write", file.as_str()];
        args.extend(cgroup.as_deref());
        let writer = hog(hog_path, &args);
        let warnings = Sysctl::set("kernel/hung_task_warnings", warnings);
        let timeout = Sysctl::set("kernel/hung_task_timeout_secs", "2");
        HungWriter {
            _timeout: timeout,
            _warnings: warnings,
            _frozen: frozen,
            writer,
            _mount: mount,
            _dev: dev,
            _dir: dir,
        }
    }

    /// The stuck writer's pid.
    pub fn pid(&self) -> u32 {
        self.writer.pid()
    }

    /// Thaws, and checks that the writer then completes.
    pub fn finish(mut self) {
        let _ = Command::new("fsfreeze")
            .args(["-u", &self._mount.0.to_string_lossy()])
            .status();
        assert!(
            self.writer.wait(WAIT).success(),
            "the writer failed after thaw"
        );
    }
}

/// A loop device whose backing file was shrunk under it, after one failed direct read past the
/// new end (sector 24576). Keep it until the event was checked: the device name is resolved
/// while the device exists. Dropping it unmounts the file system on it (if any), then detaches
/// the device and removes its file.
pub struct FailedRead {
    // Fields drop in declaration order: the mount, then the device, then its file.
    _mount: Option<Mount>,
    /// The loop device.
    pub dev: LoopDevice,
    _dir: TempDir,
}

/// Makes one block read fail: `block_rq_error` fires once with -EIO.
pub fn failed_read() -> FailedRead {
    failed_read_on(None)
}

/// [`failed_read`] on a device with an ext4 file system mounted at `mount_dir` (created
/// when missing; e.g. a pod's volume directory under kubelet's root): the file system takes
/// the device's first 8 MiB, which the shrunk file keeps, so it stays intact and only the
/// direct read past it fails.
pub fn failed_read_mounted_at(mount_dir: &Path) -> FailedRead {
    failed_read_on(Some(mount_dir))
}

fn failed_read_on(mount_dir: Option<&Path>) -> FailedRead {
    let dir = TempDir::new("npd-blk");
    let file = dir.join("disk.img");
    sized_file(&file, 16);
    if mount_dir.is_some() {
        run("mkfs.ext4", &["-q", "-F", &file.to_string_lossy(), "8M"]);
    }
    let dev = LoopDevice::attach(&file);
    let mut failed = FailedRead {
        _mount: None,
        dev,
        _dir: dir,
    };
    if let Some(mount_dir) = mount_dir {
        failed._mount = Some(Mount::new(&failed.dev.path, mount_dir));
    }
    // Shrunk in place: what the first 8 MiB hold stays.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .and_then(|f| f.set_len(8 << 20))
        .unwrap_or_else(|e| panic!("shrinking {}: {e}", file.display()));
    let out = Command::new("dd")
        .args([
            &format!("if={}", failed.dev.path),
            "of=/dev/null",
            "bs=4k",
            "skip=3072",
            "count=1",
            "iflag=direct",
        ])
        .output()
        .expect("running dd");
    assert!(!out.status.success(), "the read past the end should fail");
    failed
}
