//! Runs the real `npd-agent` binary and reads what it prints.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, OnceLock, mpsc},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The agent binary the tests run: `$NPD_AGENT_BIN` (`cargo xtask test` sets it to the binary
/// it has just built), else the one `cargo build -p npd-agent --bins` builds now (once per test
/// process). Never a binary found lying around: that could be a stale build.
pub fn agent_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    if let Some(path) = std::env::var_os("NPD_AGENT_BIN") {
        // Relative to the workspace root (tests and benches run in this crate's directory).
        return PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(path);
    }
    BUILT.get_or_init(build_agent).clone()
}

/// Builds the agent with cargo and returns the executable cargo reports.
fn build_agent() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .args([
            "build",
            "--package",
            "npd-agent",
            "--bins",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {cargo:?} build for npd-agent: {e}"));
    assert!(
        out.status.success(),
        "building npd-agent failed ({}); run `cargo xtask test`, or set NPD_AGENT_BIN",
        out.status
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "npd-agent")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported no npd-agent executable")
}

/// A running agent. Dropping it kills the process.
pub struct Agent {
    child: Child,
    lines: mpsc::Receiver<Value>,
    stderr: Arc<Mutex<String>>,
}

/// What a stopped agent left behind.
#[derive(Debug)]
pub struct Stopped {
    /// Its exit status.
    pub status: ExitStatus,
    /// The stdout lines not consumed before the stop.
    pub lines: Vec<Value>,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl Agent {
    /// Starts `npd-agent ARGS...` and waits until it says its sensor is ready.
    pub fn start(args: &[&str]) -> Agent {
        Self::start_with(Command::new(agent_binary()).args(args))
    }

    /// Starts a prepared command (for extra environment) and waits for readiness. Unless the
    /// command chooses them, the health and metrics servers are disabled (`--port 0
    /// --prometheus-port 0`), so that agents never fight over the default ports.
    ///
    /// An agent never reaches a real cluster: unless the test gives it its own API server
    /// (`--kubeconfig`), it runs with `--enable-k8s-exporter=false`, and the developer's
    /// `KUBECONFIG` and an in-cluster environment are never passed on.
    pub fn start_with(cmd: &mut Command) -> Agent {
        let given: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let has = |flag: &str| {
            given
                .iter()
                .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
        };
        for flag in ["--port", "--prometheus-port"] {
            if !has(flag) {
                cmd.args([flag, "0"]);
            }
        }
        if !has("--kubeconfig") && !has("--enable-k8s-exporter") {
            cmd.arg("--enable-k8s-exporter=false");
        }
        cmd.env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT");
        // If the test process dies without unwinding (killed), the agent goes with it.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let (line_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if line_tx.send(value).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready) = mpsc::channel();
        let sink = stderr.clone();
        let err = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("  [agent] {line}");
                // "npd-agent started" is logged once the sensor runs and the HTTP servers listen.
                if line.contains("sensor ready") || line.contains("npd-agent started") {
                    let _ = ready_tx.send(());
                }
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        let mut agent = Agent {
            child,
            lines,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if ready.recv_timeout(Duration::from_millis(100)).is_ok() {
                return agent;
            }
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "npd-agent exited with {status} before it was ready:\n{}",
                    agent.stderr()
                );
            }
            if Instant::now() > deadline {
                panic!("npd-agent not ready after 60 s:\n{}", agent.stderr());
            }
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it has written to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Waits for the first stdout line matching `pred`; panics after `timeout` with what was seen.
    pub fn wait_for(&self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if pred(&v) => return v,
                Ok(v) => {
                    if seen.len() < 50 {
                        seen.push(v);
                    }
                }
                Err(_) => panic!(
                    "no line with {what} within {timeout:?}; first lines seen: {seen:#?}\nagent stderr:\n{}",
                    self.stderr()
                ),
            }
        }
    }

    /// Every stdout line that arrives within `window` (for tests that count).
    pub fn lines_for(&self, window: Duration) -> Vec<Value> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Ok(v) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            out.push(v);
        }
        out
    }

    /// Sends SIGTERM, waits for exit (30 s at most) and returns the rest of its output.
    pub fn stop(self) -> Stopped {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(30))
    }

    /// Stops it (SIGTERM), and checks that it exited with status 0.
    pub fn stop_cleanly(self) -> Stopped {
        let stopped = self.stop();
        assert!(
            stopped.status.success(),
            "agent exit: {}\n{}",
            stopped.status,
            stopped.stderr
        );
        stopped
    }

    /// Waits for the agent to exit by itself (`timeout` at most; then it is killed and the
    /// test fails) and returns the rest of its output.
    pub fn wait_exit(mut self, timeout: Duration) -> Stopped {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "npd-agent did not exit within {timeout:?}:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The reader thread ends at EOF; collect everything it still has.
        let mut lines = Vec::new();
        while let Ok(v) = self.lines.recv_timeout(Duration::from_secs(5)) {
            lines.push(v);
        }
        Stopped {
            status,
            lines,
            stderr: self.stderr(),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether a line is the kernel event `event` (e.g. `log`, `oom_kill`).
pub fn is_kernel_event(v: &Value, event: &str) -> bool {
    v["kind"] == "kernel" && v["event"] == event
}
