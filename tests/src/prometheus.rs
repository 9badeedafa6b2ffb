//! A real Prometheus server for tests: Debian's `prometheus` package (installed with apt when
//! missing; `dpkg -s` makes that a no-op when present), started on a free 127.0.0.1 port with
//! its own scrape config and storage in a temporary directory, queried through its HTTP API,
//! and stopped (and its directory removed) on drop. Also `promtool check metrics`.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    http::{self, encode, free_port},
    kernel::TempDir,
};

/// Makes sure `prometheus` and `promtool` are installed; `Err(why)` when they cannot be.
pub fn ensure_installed() -> Result<(), String> {
    let installed = |pkg: &str| {
        Command::new("dpkg")
            .args(["-s", pkg])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if installed("prometheus") && PathBuf::from("/usr/bin/promtool").exists() {
        return Ok(());
    }
    eprintln!("installing Debian's prometheus package (apt-get)...");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("apt-get: {e}"))
            .and_then(|s| {
                if s.success() {
                    Ok(())
                } else {
                    Err(format!("apt-get {args:?}: {s}"))
                }
            })
    };
    apt(&[
        "install",
        "-y",
        "-qq",
        "--no-install-recommends",
        "prometheus",
    ])
    .or_else(|_| {
        apt(&["update", "-qq"]).and_then(|()| {
            apt(&[
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "prometheus",
            ])
        })
    })?;
    if installed("prometheus") {
        Ok(())
    } else {
        Err("prometheus is still not installed".into())
    }
}

/// A running Prometheus. Dropping it stops the server and removes its data.
pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (host:port, path `/metrics`) every `interval`, and
    /// waits until its API answers.
    pub fn start(targets: &[SocketAddr], interval: Duration) -> Prometheus {
        let dir = TempDir::new("npd-prometheus");
        let secs = interval.as_secs_f64();
        let targets = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "global:\n  scrape_interval: {secs}s\n  evaluation_interval: {secs}s\n\
             scrape_configs:\n  - job_name: npd\n    scrape_interval: {secs}s\n    scrape_timeout: {secs}s\n    \
             static_configs:\n      - targets: [{targets}]\n"
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("writing prometheus.yml");
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus.log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting prometheus: {e}"));
        let prometheus = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http::get(addr, "/-/ready").is_ok_and(|r| r.status == 200) {
                return prometheus;
            }
            if Instant::now() > deadline {
                panic!("prometheus not ready after 30 s:\n{}", prometheus.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Where its API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its log (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.join("prometheus.log")).unwrap_or_default()
    }

    /// Runs an instant query; returns the result vector (`data.result`).
    pub fn query(&self, promql: &str) -> Vec<Value> {
        let path = format!("/api/v1/query?query={}", encode(promql));
        let response =
            http::get(self.addr, &path).unwrap_or_else(|e| panic!("querying prometheus: {e}"));
        let v: Value = serde_json::from_str(&response.body).unwrap_or_else(|e| {
            panic!(
                "prometheus answered {}: {e}: {}",
                response.status, response.body
            )
        });
        assert_eq!(v["status"], "success", "query {promql:?}: {v}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The value of a query that returns one sample, `None` while it returns none.
    pub fn value(&self, promql: &str) -> Option<f64> {
        let result = self.query(promql);
        assert!(
            result.len() <= 1,
            "{promql:?} returned several series: {result:?}"
        );
        result
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse().ok())
    }

    /// Waits until `promql` has the value `expected`; panics with the last value after `timeout`.
    pub fn wait_for_value(&self, promql: &str, expected: f64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.value(promql);
            if value == Some(expected) {
                return;
            }
            if Instant::now() > deadline {
                let targets = http::get(self.addr, "/api/v1/targets")
                    .map(|r| r.body)
                    .unwrap_or_default();
                panic!(
                    "{promql} is {value:?}, not {expected}, after {timeout:?}\ntargets: {targets}\nprometheus log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // SAFETY: signalling our own child; it flushes its head block and exits.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `promtool check metrics` on an exposition: its exit code and what it printed.
pub fn promtool_check_metrics(exposition: &str) -> (i32, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting promtool: {e}"));
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(exposition.as_bytes())
        .expect("feeding promtool");
    let out = child.wait_with_output().expect("promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}
