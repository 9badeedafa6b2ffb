//! The test runner inside a `cargo xtask matrix` guest (docs/kernel-matrix.md): a static binary
//! that the guest's `/init` starts once busybox, the modules and the file systems are up. It
//! makes real kernel faults with the shared helpers of `npd_tests`, runs the real static
//! `npd-agent` against each, and writes one JSON line per check to the report channel (the
//! guest's second serial port), then `{"done":true}`.
//!
//! Each check runs under `catch_unwind`: the shared helpers assert (panic), and a panic fails
//! that check with its message as the reason, not the whole run.
//!
//! Usage: `npd-matrix-guest REPORT_PATH GUEST_JSON`, where GUEST_JSON (written by the xtask)
//! names the kernel, its testdata formats directory and what this kernel is expected to offer.
//! With `npd.boot=memcg-v1` on the kernel command line it runs only the cgroup v1 OOM check,
//! which has a boot of its own on the kernels that have cgroup v1's memory controller.

use std::{
    io::Write as _,
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use npd_tests::{
    agent::{Agent, is_kernel_event},
    faults::oom_kill_in,
    kernel::{
        ChildGuard, Frozen, LoopDevice, MemCgroup, Mount, Sysctl, TempDir, run, sized_file,
        start_hog, write_kmsg,
    },
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
/// How long to keep counting problems after a fault was reported (the hung-task detector runs
/// every 2 s here, so a stuck task is seen again at least twice in this window).
const SETTLE: Duration = Duration::from_secs(6);
const HOG: &str = "/bin/npd-test-hog";
const TRACEFS: &str = "/sys/kernel/tracing";
const CGROUP: &str = "/sys/fs/cgroup";
/// The check that runs in a boot of its own where the kernel has cgroup v1 memory.
const V1_CHECK: &str = "OOM kill, cgroup v1";
/// The kernel command-line word of that boot (the xtask's `MEMCG_V1_BOOT`).
const V1_BOOT_ARG: &str = "npd.boot=memcg-v1";

/// What the host says about this guest (`guest.json`).
struct Guest {
    /// `uname -r` expected.
    release: String,
    /// Directory holding `testdata/formats/<kernel>`.
    formats: PathBuf,
    /// Its name in the repository (`npd-agent/testdata/formats/<name>`).
    formats_name: String,
    /// The block tracepoint the agent should use (`block:block_rq_error`, or
    /// `block:block_rq_complete` where the kernel lacks it).
    block_tracepoint: String,
    /// Whether the kernel has cgroup v1's memory controller (`CONFIG_MEMCG_V1`, or a kernel
    /// older than 6.11 where it is always built with `CONFIG_MEMCG`).
    memcg_v1: bool,
    /// Whether `oom:mark_victim` has `comm` (testdata formats: not on 5.10).
    oom_has_comm: bool,
    /// The virtio disk behind qemu's blkdebug, and the 512-byte sectors it fails.
    faulty_disk_serial: String,
    /// A plain virtio disk with an ext4 file system, for files that need direct I/O.
    scratch_disk_serial: String,
    read_error_sector: u64,
    write_error_sector: u64,
}

/// One check: a name in the report, and what it runs.
type Check = fn(&Guest) -> Outcome;

/// What [`observe`] waits for: a line matching this.
type Want<'a> = &'a dyn Fn(&Value) -> bool;

/// The outcome of one check.
enum Outcome {
    Pass(String),
    /// Not applicable to this kernel, with the reason.
    NotApplicable(String),
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(report_path), Some(guest_path)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: npd-matrix-guest REPORT_PATH GUEST_JSON");
        std::process::exit(2);
    };
    let mut report = std::fs::OpenOptions::new()
        .write(true)
        .open(report_path)
        .unwrap_or_else(|e| panic!("opening the report channel {report_path}: {e}"));
    let guest = read_guest(Path::new(guest_path));
    let mut send = |line: Value| {
        eprintln!("npd-matrix-guest: {line}");
        // One line, one write: the host reads whole lines.
        let _ = report.write_all(format!("{line}\n").as_bytes());
        let _ = report.flush();
    };
    send(json!({"guest": guest.release, "uname": uname_r()}));

    let checks: Vec<(&str, Check)> = vec![
        ("agent starts", check_agent_starts),
        ("tracefs formats", check_formats),
        ("kmsg exact text", check_kmsg),
        ("OOM kill, cgroup v2", check_oom_v2),
        (V1_CHECK, check_oom_v1),
        ("hung task", |g| check_hung_task(g, "10")),
        ("hung task, no warnings", |g| check_hung_task(g, "0")),
        ("block: loop read past end", check_loop_read),
        ("block: blkdebug read EIO", |g| check_virtio(g, Op::Read)),
        ("block: blkdebug write EIO", |g| check_virtio(g, Op::Write)),
    ];
    // Where the kernel has cgroup v1's memory controller, its OOM check gets a boot of its own
    // (`npd.boot=memcg-v1` on the kernel command line): after the cgroup v2 check, the
    // controller returns from cgroup v2 only once its dying memory cgroups are freed, which
    // 5.10 was seen not to do within a minute, so a v1 mount in the same boot stayed EBUSY.
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let v1_boot = cmdline.split_whitespace().any(|w| w == V1_BOOT_ARG);
    let checks = checks.into_iter().filter(|(name, _)| {
        if v1_boot {
            *name == V1_CHECK
        } else {
            !(guest.memcg_v1 && *name == V1_CHECK)
        }
    });
    for (name, check) in checks {
        let start = Instant::now();
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| check(&guest)));
        let secs = (start.elapsed().as_secs_f64() * 10.0).round() / 10.0;
        let (status, detail) = match outcome {
            Ok(Outcome::Pass(detail)) => ("pass", detail),
            Ok(Outcome::NotApplicable(why)) => ("n/a", why),
            Err(payload) => ("fail", panic_text(payload.as_ref())),
        };
        send(json!({"check": name, "status": status, "detail": detail, "secs": secs}));
    }
    send(json!({"done": true}));
}

fn read_guest(path: &Path) -> Guest {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let v: Value = serde_json::from_str(&text).expect("guest.json is JSON");
    let s = |k: &str| {
        v[k].as_str()
            .unwrap_or_else(|| panic!("{k} missing"))
            .to_string()
    };
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} missing"));
    Guest {
        release: s("release"),
        formats: PathBuf::from(s("formats")),
        formats_name: s("formats_name"),
        block_tracepoint: s("block_tracepoint"),
        memcg_v1: v["memcg_v1"].as_bool().expect("memcg_v1 missing"),
        oom_has_comm: std::fs::read_to_string(
            Path::new(&s("formats")).join("oom_mark_victim.format"),
        )
        .is_ok_and(|f| f.contains(" comm;") || f.contains(" comm[")),
        faulty_disk_serial: s("faulty_disk_serial"),
        scratch_disk_serial: s("scratch_disk_serial"),
        read_error_sector: n("read_error_sector"),
        write_error_sector: n("write_error_sector"),
    }
}

fn uname_r() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The panic message (first lines; the whole of it went to the console).
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".into());
    let mut short: String = text.lines().take(4).collect::<Vec<_>>().join(" | ");
    if short.len() > 400 {
        let mut cut = 400;
        while !short.is_char_boundary(cut) {
            cut -= 1;
        }
        short.truncate(cut);
        short.push_str("...");
    }
    short
}

/// The agent in standalone mode (problems as JSON lines), also printing kernel events.
fn agent() -> Agent {
    Agent::start_with(Command::new("/bin/npd-agent").args([
        "run",
        "--source",
        "ebpf",
        "--enable-k8s-exporter=false",
        "--kernel-events",
        "--log-format",
        "json",
    ]))
}

/// The fields of the agent's startup line (`npd-agent started`), waiting for it: the harness
/// may see the agent ready (`sensor ready`) a little before that line is logged.
fn startup_fields(agent: &Agent) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(fields) = find_startup(agent) {
            return fields;
        }
        assert!(
            Instant::now() < deadline,
            "no `npd-agent started` line:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn find_startup(agent: &Agent) -> Option<Value> {
    for line in agent.stderr().lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let fields = if v["fields"].is_object() {
            v["fields"].clone()
        } else {
            v
        };
        if fields["message"] == "npd-agent started" {
            return Some(fields);
        }
    }
    None
}

fn list(v: &Value) -> Vec<String> {
    v.as_str()
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty() && *s != "none")
        .map(str::to_string)
        .collect()
}

fn check_agent_starts(guest: &Guest) -> Outcome {
    let uname = uname_r();
    assert_eq!(uname, guest.release, "booted the wrong kernel");
    let agent = agent();
    let fields = startup_fields(&agent);
    assert_eq!(fields["source"], "ebpf", "{fields}");
    let attached = list(&fields["tracepoints"]);
    let disabled = list(&fields["tracepoints_disabled"]);
    for needed in [
        "sched:sched_process_hang",
        "oom:mark_victim",
        guest.block_tracepoint.as_str(),
    ] {
        assert!(
            attached.iter().any(|a| a == needed),
            "{needed} not attached; attached: {attached:?}; disabled: {disabled:?}\n{}",
            agent.stderr()
        );
    }
    let console = attached.iter().any(|a| a == "printk:console");
    let kmsg_reader = fields["kmsg_reader"].as_bool().unwrap_or(false);
    assert!(
        console || kmsg_reader,
        "neither printk:console nor the /dev/kmsg reader: {fields}"
    );
    let stopped = agent.stop();
    assert!(stopped.status.success(), "agent exit: {}", stopped.status);
    let mut detail = format!("attached {}", attached.join(" "));
    if !disabled.is_empty() {
        detail.push_str(&format!("; not attached: {}", disabled.join(" ")));
    }
    if guest.block_tracepoint == "block:block_rq_complete" {
        detail.push_str("; block errors from block_rq_complete filtered in the kernel");
    }
    if !console {
        detail.push_str("; kernel messages from /dev/kmsg");
    }
    Outcome::Pass(detail)
}

fn check_formats(guest: &Guest) -> Outcome {
    let mut compared = 0;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&guest.formats)
        .unwrap_or_else(|e| panic!("reading {}: {e}", guest.formats.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    files.sort();
    let mut missing = Vec::new();
    for file in files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".format") else {
            continue;
        };
        // `block_block_rq_error` -> events/block/block_rq_error/format.
        let (group, event) = stem.split_once('_').expect("group_event.format");
        let want = std::fs::read_to_string(&file).unwrap();
        let live = Path::new(TRACEFS)
            .join("events")
            .join(group)
            .join(event)
            .join("format");
        let have = std::fs::read_to_string(&live);
        if want == "MISSING\n" {
            assert!(
                have.is_err(),
                "testdata says {group}:{event} is missing, the kernel has it"
            );
            missing.push(format!("{group}:{event}"));
        } else {
            let have = have.unwrap_or_else(|e| panic!("{}: {e}", live.display()));
            if have != want {
                let diff = want
                    .lines()
                    .zip(have.lines())
                    .find(|(w, h)| w != h)
                    .map(|(w, h)| format!("testdata `{w}`, kernel `{h}`"))
                    .unwrap_or_else(|| "lengths differ".into());
                panic!("{group}:{event} differs: {diff}");
            }
        }
        compared += 1;
    }
    assert!(compared >= 5, "only {compared} format files compared");
    let mut detail = format!(
        "{compared} files equal testdata/formats/{}",
        guest.formats_name
    );
    if !missing.is_empty() {
        detail.push_str(&format!("; absent on both: {}", missing.join(" ")));
    }
    Outcome::Pass(detail)
}

fn check_kmsg(_guest: &Guest) -> Outcome {
    let agent = agent();
    let fields = startup_fields(&agent);
    let via = if list(&fields["tracepoints"])
        .iter()
        .any(|a| a == "printk:console")
    {
        "printk:console"
    } else {
        "/dev/kmsg"
    };
    let line = format!("npd-matrix: exact text {}", npd_tests::unique("kmsg"));
    write_kmsg(&line);
    let event = agent.wait_for(WAIT, "the kmsg line", |v| {
        is_kernel_event(v, "log")
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("npd-matrix: exact text"))
    });
    assert_eq!(event["message"], line.as_str(), "text not exact: {event}");
    assert!(agent.stop().status.success());
    Outcome::Pass(format!("exact text via {via}"))
}

/// Reads the agent's lines until every one of `wants` (a description and a predicate) has
/// matched a line, then [`SETTLE`] more; returns the first match of each, in order. Every
/// problem (`kind: event`) the agent reported in that time must be the one expected: one
/// fault, exactly one problem.
fn observe(agent: &Agent, wants: &[(&str, Want)]) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    let mut seen: Vec<Value> = Vec::new();
    let found = |seen: &[Value]| -> Vec<Option<Value>> {
        wants
            .iter()
            .map(|(_, pred)| seen.iter().find(|v| pred(v)).cloned())
            .collect()
    };
    loop {
        seen.extend(agent.lines_for(Duration::from_millis(250)));
        if found(&seen).iter().all(Option::is_some) {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<&str> = wants
                .iter()
                .zip(found(&seen))
                .filter(|(_, f)| f.is_none())
                .map(|((what, _), _)| *what)
                .collect();
            panic!(
                "within {WAIT:?} no {}; the agent printed: {seen:?}",
                missing.join(", no ")
            );
        }
    }
    seen.extend(agent.lines_for(SETTLE));
    let problems: Vec<&Value> = seen.iter().filter(|v| v["kind"] == "event").collect();
    assert_eq!(
        problems.len(),
        1,
        "one fault, {} problems: {problems:?}",
        problems.len()
    );
    found(&seen).into_iter().map(Option::unwrap).collect()
}

fn is_problem(v: &Value, reason: &str) -> bool {
    v["kind"] == "event" && v["reason"] == reason
}

fn oom_check(guest: &Guest, hierarchy: &str) -> Outcome {
    let agent = agent();
    let cgroup = MemCgroup::new(32);
    let pid = oom_kill_in(Path::new(HOG), &cgroup);
    let mut seen = observe(
        &agent,
        &[
            ("OOMKilling problem", &|v| {
                is_problem(v, "OOMKilling") && v["pid"] == pid
            }),
            ("oom_kill event", &|v| {
                is_kernel_event(v, "oom_kill") && v["pid"] == pid
            }),
        ],
    );
    let (event, kernel_event) = (seen.remove(0), seen.remove(0));
    let message = event["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains(&pid.to_string()), "{event}");
    // comm comes from the tracepoint where the kernel has it. 5.10's gives the pid only: the
    // agent reads /proc/<pid> as the event arrives, and the victim may already be gone.
    let from_proc = !guest.oom_has_comm;
    if from_proc {
        let found = event["comm"] == "npd-test-hog";
        assert!(found || event["comm"].is_null(), "wrong comm: {event}");
        assert!(agent.stop().status.success());
        return Outcome::Pass(format!(
            "{hierarchy}: one OOMKilling: {message} (mark_victim has the pid only; {})",
            if found {
                "comm read from /proc"
            } else {
                "the victim was gone before /proc was read"
            }
        ));
    }
    assert!(message.contains("npd-test-hog"), "{event}");
    // Where mark_victim has the victim's fields it passes the task: the victim's memory
    // cgroup is walked in the kernel (the `victim_cgroup` raw tracepoint program, with
    // offsets from this kernel's BTF), and names the cgroup the hog ran in.
    let stderr = agent.stderr();
    assert!(
        !stderr.contains("OOM victims' memory cgroups are read from"),
        "the victim's cgroup is not walked in the kernel:\n{stderr}"
    );
    assert_eq!(
        kernel_event["cgroup"],
        cgroup.kernel_path().as_str(),
        "{kernel_event}"
    );
    assert!(agent.stop().status.success());
    Outcome::Pass(format!(
        "{hierarchy}: one OOMKilling: {message}; memory cgroup {} walked at mark_victim",
        cgroup.kernel_path()
    ))
}

/// Takes the memory controller off cgroup v2's root when dropped (also when the check
/// failed), so that cgroup v1 can have it.
struct MemoryOffV2;

impl Drop for MemoryOffV2 {
    fn drop(&mut self) {
        let _ = std::fs::write(Path::new(CGROUP).join("cgroup.subtree_control"), "-memory");
    }
}

fn check_oom_v2(guest: &Guest) -> Outcome {
    let _mount = Mount::with("cgroup2", "cgroup2", CGROUP, "");
    let _off = MemoryOffV2;
    oom_check(guest, "cgroup v2")
}

fn check_oom_v1(guest: &Guest) -> Outcome {
    if !guest.memcg_v1 {
        return Outcome::NotApplicable(
            "kernel built without cgroup v1 memory (CONFIG_MEMCG_V1 is not set)".into(),
        );
    }
    let _root = Mount::with("tmpfs", "tmpfs", CGROUP, "");
    // This check has a boot of its own, where cgroup v2 never had the memory controller. Run
    // after the v2 check (`cargo xtask matrix` does not), this mount is EBUSY until the
    // controller has left cgroup v2, once its last cgroup there is freed: dropping the caches
    // frees a dying memory cgroup that page cache is charged to.
    let dir = format!("{CGROUP}/memory");
    let deadline = Instant::now() + Duration::from_secs(60);
    let _memory = loop {
        match std::panic::catch_unwind(|| Mount::with("cgroup", "cgroup", &dir, "memory")) {
            Ok(mount) => break mount,
            Err(e) if Instant::now() < deadline && panic_text(e.as_ref()).contains("busy") => {
                let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => std::panic::resume_unwind(e),
        }
    };
    oom_check(guest, "cgroup v1")
}

/// Mounting for the guest (the shared `Mount` takes a device only).
trait MountWith {
    fn with(fstype: &str, source: &str, dir: &str, options: &str) -> Mount;
}

impl MountWith for Mount {
    fn with(fstype: &str, source: &str, dir: &str, options: &str) -> Mount {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {dir}: {e}"));
        let mut args = vec!["-t", fstype];
        if !options.is_empty() {
            args.extend(["-o", options]);
        }
        args.extend([source, dir]);
        run("mount", &args);
        Mount(PathBuf::from(dir))
    }
}

/// A writer stuck on a frozen, loop-mounted ext4, as `npd_tests::faults::HungWriter`, on an
/// ext4 image made on the host by `mkfs.ext4` (busybox has no ext4 mkfs).
struct HungWriter {
    // Dropped in this order: sysctls, thaw, writer, mount, loop device, files.
    _timeout: Sysctl,
    _warnings: Sysctl,
    _frozen: Frozen,
    writer: ChildGuard,
    mount: Mount,
    _dev: LoopDevice,
    _dir: TempDir,
}

fn check_hung_task(_guest: &Guest, warnings: &str) -> Outcome {
    let agent = agent();
    let dir = TempDir::new("npd-hung");
    let image = dir.join("fs.img");
    std::fs::copy("/matrix/ext4.img", &image).expect("copying the ext4 image");
    let dev = LoopDevice::attach(&image);
    let mount = Mount::new(&dev.path, &dir.join("mnt"));
    let fstype = run(
        "sh",
        &[
            "-c",
            &format!("grep ' {} ' /proc/mounts", mount.0.display()),
        ],
    );
    assert!(fstype.contains(" ext4 "), "not ext4: {fstype}");
    let frozen = Frozen::new(&mount.0);
    let writer =
        start_hog(Command::new(HOG).args(["write", &mount.0.join("file").to_string_lossy()]));
    let hung = HungWriter {
        _warnings: Sysctl::set("kernel/hung_task_warnings", warnings),
        _timeout: Sysctl::set("kernel/hung_task_timeout_secs", "2"),
        _frozen: frozen,
        writer,
        mount,
        _dev: dev,
        _dir: dir,
    };
    let pid = hung.writer.pid();
    let event = observe(
        &agent,
        &[("TaskHung problem", &|v| {
            is_problem(v, "TaskHung") && v["pid"] == pid
        })],
    )
    .remove(0);
    assert_eq!(event["comm"], "npd-test-hog", "{event}");
    // Thaw; the writer then completes.
    let mut hung = hung;
    run("fsfreeze", &["-u", &hung.mount.0.to_string_lossy()]);
    assert!(
        hung.writer.wait(WAIT).success(),
        "the writer failed after thaw"
    );
    drop(hung);
    assert!(agent.stop().status.success());
    Outcome::Pass(format!(
        "hung_task_warnings={warnings}: one TaskHung for pid {pid}"
    ))
}

/// `LOOP_SET_DIRECT_IO` (linux/loop.h).
const LOOP_SET_DIRECT_IO: libc::c_ulong = 0x4C08;

/// A 16 MiB file on `dir`, on a loop device (with direct I/O when `direct_io`), then shrunk to
/// 8 MiB; returns the device and the outcome of one direct read past the new end (block
/// 3072 of 4 KiB = sector 24576).
fn shrunk_loop_read(dir: &Path, direct_io: bool) -> (LoopDevice, std::process::Output) {
    let file = dir.join(npd_tests::unique("loop"));
    sized_file(&file, 16);
    let dev = LoopDevice::attach(&file);
    if direct_io {
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .open(&dev.path)
            .unwrap_or_else(|e| panic!("opening {}: {e}", dev.path));
        // SAFETY: an ioctl on a descriptor we own, with an integer argument.
        let rc = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                LOOP_SET_DIRECT_IO as _,
                1 as libc::c_ulong,
            )
        };
        assert_eq!(
            rc,
            0,
            "LOOP_SET_DIRECT_IO on {}: {}",
            dev.path,
            std::io::Error::last_os_error()
        );
    }
    sized_file(&file, 8);
    let out = Command::new("dd")
        .args([
            &format!("if={}", dev.path),
            "of=/dev/null",
            "bs=4k",
            "skip=3072",
            "count=1",
            "iflag=direct",
        ])
        .output()
        .expect("running dd");
    (dev, out)
}

fn check_loop_read(guest: &Guest) -> Outcome {
    // Buffered loop first, without the agent (a probe, not the check): on some kernels the
    // loop driver fills a short buffered read with zeros instead of failing it.
    let tmp = TempDir::new("npd-loop");
    let (buffered_dev, buffered) = shrunk_loop_read(&tmp.0, false);
    drop(buffered_dev);
    let buffered = if buffered.status.success() {
        "buffered loop reads zeros past the end"
    } else {
        "buffered loop fails the read too"
    };
    // The check: a loop device doing direct I/O on a file of the ext4 scratch disk (tmpfs
    // takes direct I/O only since 6.6), where a short read fails with EIO on every kernel.
    let scratch = virtio_disk(&guest.scratch_disk_serial);
    let mount = Mount::new(&format!("/dev/{scratch}"), &tmp.join("scratch"));
    let agent = agent();
    let (dev, out) = shrunk_loop_read(&mount.0, true);
    assert!(
        !out.status.success(),
        "the direct read past the end of {} should fail",
        dev.path
    );
    let name = dev.name().to_string();
    let mut found = observe(
        &agent,
        &[
            ("block_error kernel event", &|v| {
                is_kernel_event(v, "block_error") && v["device"] == name.as_str()
            }),
            ("IOError problem", &|v| {
                is_problem(v, "IOError")
                    && (v["device"] == name.as_str()
                        || v["message"].as_str().is_some_and(|m| m.contains(&name)))
            }),
        ],
    );
    let event = found.pop().unwrap();
    let kernel = found.pop().unwrap();
    assert_eq!(kernel["error"], -5, "{kernel}");
    assert_eq!(kernel["sector"], 24576, "{kernel}");
    drop(dev);
    drop(mount);
    assert!(agent.stop().status.success());
    Outcome::Pass(format!(
        "one IOError: {}; ({buffered})",
        event["message"].as_str().unwrap_or_default()
    ))
}

#[derive(Clone, Copy)]
enum Op {
    Read,
    Write,
}

/// The virtio disk whose serial is `serial` (`/sys/block/vdX/serial`).
fn virtio_disk(serial: &str) -> String {
    for entry in std::fs::read_dir("/sys/block").expect("/sys/block") {
        let name = entry
            .expect("entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        let path = Path::new("/sys/block").join(&name).join("serial");
        if std::fs::read_to_string(&path).is_ok_and(|s| s.trim() == serial) {
            return name;
        }
    }
    panic!("no virtio disk with serial {serial} (is virtio_blk loaded?)")
}

fn check_virtio(guest: &Guest, op: Op) -> Outcome {
    let disk = virtio_disk(&guest.faulty_disk_serial);
    let agent = agent();
    let dev = format!("/dev/{disk}");
    // 4 KiB blocks: block N starts at 512-byte sector 8 N.
    let (args, sector, rwbs_op) = match op {
        Op::Read => (
            vec![
                format!("if={dev}"),
                "of=/dev/null".into(),
                format!("skip={}", guest.read_error_sector / 8),
                "iflag=direct".into(),
            ],
            guest.read_error_sector,
            "READ",
        ),
        Op::Write => (
            vec![
                "if=/dev/zero".into(),
                format!("of={dev}"),
                format!("seek={}", guest.write_error_sector / 8),
                "oflag=direct".into(),
            ],
            guest.write_error_sector,
            "WRITE",
        ),
    };
    let out = Command::new("dd")
        .args(&args)
        .args(["bs=4096", "count=1"])
        .output()
        .expect("running dd");
    assert!(
        !out.status.success(),
        "dd {args:?} should fail with EIO: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut found = observe(
        &agent,
        &[
            ("block_error kernel event", &|v| {
                is_kernel_event(v, "block_error") && v["device"] == disk.as_str()
            }),
            ("IOError problem", &|v| {
                is_problem(v, "IOError")
                    && (v["device"] == disk.as_str()
                        || v["message"].as_str().is_some_and(|m| m.contains(&disk)))
            }),
        ],
    );
    let event = found.pop().unwrap();
    let kernel = found.pop().unwrap();
    assert_eq!(kernel["error"], -5, "{kernel}");
    assert_eq!(kernel["sector"], sector, "{kernel}");
    assert_eq!(kernel["op"], rwbs_op, "{kernel}");
    assert!(agent.stop().status.success());
    Outcome::Pass(format!(
        "dd: {}; one IOError: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .next()
            .unwrap_or_default(),
        event["message"].as_str().unwrap_or_default()
    ))
}
