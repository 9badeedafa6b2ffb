//! The image `cargo xtask image` built (named by `NPD_IMAGE`, which `cargo xtask test` sets),
//! run with podman as a Kubernetes container spec says: its capabilities, seccomp profile,
//! read-only root, privilege, user, host mounts, environment and command line. A container is
//! removed when its guard is dropped.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The image to test, from `NPD_IMAGE`; `Err` says what is missing.
pub fn image() -> Result<String, String> {
    let image = std::env::var("NPD_IMAGE").map_err(|_| {
        "NPD_IMAGE is not set: run `cargo xtask test`, which builds the image (`cargo xtask image`)"
            .to_string()
    })?;
    let out = podman(&["image", "exists", &image]).map_err(|e| format!("podman: {e}"))?;
    if !out.status.success() {
        return Err(format!("image {image} is not in podman's storage"));
    }
    Ok(image)
}

/// Podman with the private configuration `cargo xtask image` writes (no default ulimits:
/// this sandbox cannot set them).
fn podman_command() -> Command {
    let cache = std::env::var_os("NPD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
                .join(".cache/npd")
        });
    let conf = cache.join("podman/containers.conf");
    if !conf.is_file() {
        let _ = std::fs::create_dir_all(conf.parent().unwrap_or(Path::new("/")));
        let _ = std::fs::write(&conf, "[containers]\ndefault_ulimits = []\n");
    }
    let mut cmd = Command::new("podman");
    cmd.env("CONTAINERS_CONF", conf);
    cmd
}

/// Runs `podman ARGS`.
pub fn podman(args: &[&str]) -> std::io::Result<Output> {
    podman_command().args(args).output()
}

/// A container spec's part that `podman run` can express.
#[derive(Clone, Debug, Default)]
pub struct Spec {
    /// `command` (replaces the entrypoint), when given.
    pub command: Vec<String>,
    /// `args`.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Bind mounts: host path, container path, read-only.
    pub mounts: Vec<(PathBuf, String, bool)>,
    /// `securityContext.privileged`.
    pub privileged: bool,
    /// `securityContext.readOnlyRootFilesystem`.
    pub read_only: bool,
    /// `securityContext.capabilities.drop` contains `ALL`.
    pub drop_all: bool,
    /// `securityContext.capabilities.add`.
    pub cap_add: Vec<String>,
    /// `seccompProfile.type` is `Unconfined` (else podman's default profile, as a kubelet
    /// with `RuntimeDefault` applies its runtime's).
    pub seccomp_unconfined: bool,
    /// `securityContext.runAsUser`.
    pub user: Option<u32>,
}

impl Spec {
    /// The spec of the first container of a pod template (`spec.template.spec`, as JSON), with
    /// the volumes' host paths; a ConfigMap volume is mounted from `config_dir`, `NODE_NAME`
    /// from `fieldRef spec.nodeName` is `node`.
    pub fn from_pod(pod: &Value, config_dir: &Path, node: &str) -> Spec {
        let container = &pod["containers"][0];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        };
        let security = &container["securityContext"];
        let seccomp = security["seccompProfile"]["type"]
            .as_str()
            .or_else(|| pod["securityContext"]["seccompProfile"]["type"].as_str());
        let mut spec = Spec {
            command: strings(&container["command"]),
            args: strings(&container["args"]),
            privileged: security["privileged"].as_bool().unwrap_or(false),
            read_only: security["readOnlyRootFilesystem"]
                .as_bool()
                .unwrap_or(false),
            drop_all: strings(&security["capabilities"]["drop"]).contains(&"ALL".to_owned()),
            cap_add: strings(&security["capabilities"]["add"]),
            seccomp_unconfined: seccomp == Some("Unconfined"),
            user: security["runAsUser"]
                .as_u64()
                .and_then(|u| u32::try_from(u).ok()),
            ..Spec::default()
        };
        for env in container["env"].as_array().into_iter().flatten() {
            let name = env["name"].as_str().unwrap_or_default().to_owned();
            let value = match (
                env["value"].as_str(),
                env["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            ) {
                (Some(v), _) => v.to_owned(),
                (None, Some("spec.nodeName")) => node.to_owned(),
                _ => continue,
            };
            spec.env.push((name, value));
        }
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            let name = mount["name"].as_str().unwrap_or_default();
            let path = mount["mountPath"].as_str().unwrap_or_default().to_owned();
            let read_only = mount["readOnly"].as_bool().unwrap_or(false);
            let volume = pod["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["name"] == name)
                .unwrap_or_else(|| panic!("volume {name} of the mount {path}"));
            let host = if let Some(host) = volume["hostPath"]["path"].as_str() {
                PathBuf::from(host)
            } else if volume.get("configMap").is_some() {
                config_dir.to_path_buf()
            } else {
                panic!("volume {name}: only hostPath and configMap volumes are expressed");
            };
            spec.mounts.push((host, path, read_only));
        }
        spec
    }

    /// `podman run` arguments for this spec.
    fn run_args(&self, name: &str, image: &str) -> Vec<String> {
        // runc: crun refuses a host whose cgroups are in hybrid mode. The host's network, as
        // the test API server listens on loopback.
        let mut args: Vec<String> = ["run", "-d", "--name", name, "--runtime", "runc"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        args.push("--network=host".into());
        if self.privileged {
            args.push("--privileged".into());
        }
        if self.read_only {
            args.push("--read-only".into());
        }
        if self.drop_all {
            args.push("--cap-drop=ALL".into());
        }
        for cap in &self.cap_add {
            args.push(format!("--cap-add={cap}"));
        }
        if self.seccomp_unconfined {
            args.push("--security-opt=seccomp=unconfined".into());
        }
        if let Some(user) = self.user {
            args.push(format!("--user={user}"));
        }
        for (host, path, read_only) in &self.mounts {
            let ro = if *read_only { ":ro" } else { "" };
            args.push(format!("--volume={}:{path}{ro}", host.display()));
        }
        for (key, value) in &self.env {
            args.push(format!("--env={key}={value}"));
        }
        if let Some((entrypoint, rest)) = self.command.split_first() {
            args.push(format!("--entrypoint={entrypoint}"));
            args.push(image.to_owned());
            args.extend(rest.iter().cloned());
        } else {
            args.push(image.to_owned());
        }
        args.extend(self.args.iter().cloned());
        args
    }
}

/// A running container, removed on drop.
pub struct Container {
    /// Its name.
    pub name: String,
}

impl Container {
    /// Starts `image` as `spec` says.
    pub fn run(image: &str, spec: &Spec) -> Container {
        let name = crate::unique("npd-container");
        let args = spec.run_args(&name, image);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = podman(&refs).expect("running podman");
        let container = Container { name };
        assert!(
            out.status.success(),
            "podman {}\nfailed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        container
    }

    /// What it wrote so far (stdout and stderr).
    pub fn logs(&self) -> String {
        let out = podman(&["logs", &self.name]).expect("podman logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Waits until its logs contain `text`; panics with the logs after `timeout`.
    pub fn wait_log(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let logs = self.logs();
            if logs.contains(text) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no {text:?} in the container's logs:\n{logs}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The main process's pid on the host.
    pub fn pid(&self) -> u32 {
        let out =
            podman(&["inspect", "--format", "{{.State.Pid}}", &self.name]).expect("podman inspect");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a pid")
    }

    /// Stops it (SIGTERM, then SIGKILL after `grace`) and returns its exit code.
    pub fn stop(&self, grace: Duration) -> i64 {
        let grace = grace.as_secs().to_string();
        let _ = podman(&["stop", "-t", &grace, &self.name]);
        let out = podman(&["inspect", "--format", "{{.State.ExitCode}}", &self.name])
            .expect("podman inspect");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(-1)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "2", &self.name]);
    }
}
