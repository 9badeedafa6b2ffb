//! A real Kubernetes API server (etcd + kube-apiserver v1.20 on 127.0.0.1) for tests, run by
//! `tests/k8s/cluster.sh` (which builds kube-apiserver once and caches it, see
//! `tests/k8s/build-kube-apiserver.sh`).
//!
//! - [`ApiServer::start`] starts a private one, stopped when it is dropped (also when the test
//!   panics); [`ApiServer::shared`] gives one per test binary, stopped when the process exits.
//! - Both return `None` only when kube-apiserver cannot be built on this machine (no apt, or
//!   neither root nor password-less sudo to install the build tools), and only outside a
//!   strict run (see [`crate::strict`]; in CI this fails the test): the test then returns
//!   early, counted as skipped. Any other failure panics.
//! - Helpers: an admin [`kube::Client`], Nodes with a kubelet-like `Ready` condition, `kubectl`,
//!   the shipped RBAC (`deploy/kubernetes/rbac.yaml`), manifests applied for one test (deleted
//!   on drop), and a kubeconfig holding a token of npd's (or any) service account minted with
//!   the TokenRequest API.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
};

use k8s_openapi::api::{
    authentication::v1::{TokenRequest, TokenRequestSpec},
    core::v1::{Node, NodeCondition, ServiceAccount},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};

/// The Node's condition of type `type_`, if it has one.
pub fn node_condition<'a>(node: &'a Node, type_: &str) -> Option<&'a NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// The status of condition `type_` on `node`, if it has one.
pub fn condition_status<'a>(node: &'a Node, type_: &str) -> Option<&'a str> {
    node_condition(node, type_).map(|c| c.status.as_str())
}

/// Reads a watch on a Node until a modification shows condition `type_` with status `want`
/// (each event within 30 s).
pub async fn watch_for_condition<S>(watch: &mut S, type_: &str, want: &str)
where
    S: futures::Stream<Item = Result<kube::api::WatchEvent<Node>, kube::Error>> + Unpin,
{
    use futures::TryStreamExt as _;
    loop {
        let event = tokio::time::timeout(std::time::Duration::from_secs(30), watch.try_next())
            .await
            .unwrap_or_else(|_| panic!("{type_}={want} within 30 s"))
            .expect("watch error")
            .expect("watch ended");
        if let kube::api::WatchEvent::Modified(node) = event
            && condition_status(&node, type_) == Some(want)
        {
            return;
        }
    }
}

/// Waits (at most a minute) until the agent has written condition `type_` of `node` with
/// status `want`; returns the Node's resourceVersion then, for a watch from there.
pub async fn wait_for_node_condition(
    nodes: &Api<Node>,
    node: &str,
    type_: &str,
    want: &str,
) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Ok(n) = nodes.get(node).await
            && condition_status(&n, type_) == Some(want)
        {
            return n.metadata.resource_version.expect("a resourceVersion");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not write {type_}={want} on Node {node}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The namespace and name of npd's service account in `deploy/kubernetes/rbac.yaml`.
pub const SERVICE_ACCOUNT: (&str, &str) = ("kube-system", "npd");

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// A running etcd + kube-apiserver in a private directory.
#[derive(Debug)]
pub struct ApiServer {
    /// The cluster directory (`env`, `kubeconfig`, logs...).
    pub dir: PathBuf,
    /// `https://127.0.0.1:<port>`.
    pub url: String,
    /// Admin kubeconfig (group `system:masters`).
    pub kubeconfig: PathBuf,
    /// The CA that signed the server's certificate.
    pub ca_file: PathBuf,
    /// The admin bearer token.
    pub admin_token: String,
    /// Stop it on drop (false for the shared one, stopped at exit).
    owned: bool,
}

impl ApiServer {
    /// Starts a private API server, stopped when the value is dropped. `None` (with the reason
    /// printed) only when kube-apiserver cannot be built here.
    pub fn start(test: &str) -> Option<ApiServer> {
        let available = match cannot_build_reason() {
            Some(reason) => Err(format!("no Kubernetes API server: {reason}")),
            None => Ok(()),
        };
        if !crate::prerequisite(test, available) {
            return None;
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "npd-k8s-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        // Constructed first so that a failed `up` is cleaned up by Drop too.
        let mut server = ApiServer {
            kubeconfig: dir.join("kubeconfig"),
            ca_file: dir.join("ca.crt"),
            dir,
            url: String::new(),
            admin_token: String::new(),
            owned: true,
        };
        server.cluster("up");
        let env = std::fs::read_to_string(server.dir.join("env")).expect("reading the cluster env");
        server.url = env
            .lines()
            .find_map(|l| l.strip_prefix("APISERVER_URL="))
            .expect("APISERVER_URL in env")
            .trim_matches('\'')
            .to_owned();
        server.admin_token = std::fs::read_to_string(server.dir.join("admin-token"))
            .expect("reading admin-token")
            .trim()
            .to_owned();
        Some(server)
    }

    /// The API server shared by every test of this binary: started on first use, stopped when
    /// the process exits. Tests using it must use distinct Node names and must not stop it.
    pub fn shared(test: &str) -> Option<&'static ApiServer> {
        static SHARED: OnceLock<Option<ApiServer>> = OnceLock::new();
        extern "C" fn stop_shared() {
            if let Some(Some(server)) = SHARED.get() {
                server.down();
            }
        }
        let server = SHARED.get_or_init(|| {
            let mut server = ApiServer::start(test)?;
            server.owned = false;
            // SAFETY: registers a plain function without arguments, run once at exit.
            let rc = unsafe { libc::atexit(stop_shared) };
            assert_eq!(rc, 0, "atexit failed");
            Some(server)
        });
        let available = match server {
            Some(_) => Ok(()),
            None => Err("no Kubernetes API server (see above)".into()),
        };
        crate::prerequisite(test, available);
        server.as_ref()
    }

    /// Stops kube-apiserver only (etcd keeps the data): a simulated API server outage.
    pub fn stop_apiserver(&self) {
        self.cluster("stop-apiserver");
    }

    /// Starts kube-apiserver again on the same address and waits until it is ready.
    pub fn start_apiserver(&self) {
        self.cluster("start-apiserver");
    }

    fn cluster(&self, command: &str) {
        let script = repo_root().join("tests/k8s/cluster.sh");
        let out = Command::new(&script)
            .arg(command)
            .arg(&self.dir)
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "cluster.sh {command} {} failed ({}):\n{}",
            self.dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn down(&self) {
        let script = repo_root().join("tests/k8s/cluster.sh");
        match Command::new(&script).arg("down").arg(&self.dir).output() {
            Ok(out) if out.status.success() => {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
            Ok(out) => eprintln!(
                "cluster.sh down {} failed:\n{}",
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("running {}: {e}", script.display()),
        }
    }

    /// A kube client with the admin kubeconfig.
    pub async fn admin_client(&self) -> Client {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    /// Runs `kubectl --kubeconfig <admin> ARGS...`.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("running kubectl")
    }

    /// Creates Node `name` with a kubelet-like `Ready=True` condition (written by field
    /// manager `kubelet`), as a registered node has. Returns the Node as stored.
    pub async fn create_node(&self, name: &str) -> Node {
        let client = self.admin_client().await;
        let nodes: Api<Node> = Api::all(client);
        let node: Node = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": { "name": name, "labels": { "kubernetes.io/hostname": name } },
        }))
        .expect("a Node");
        nodes
            .create(&PostParams::default(), &node)
            .await
            .expect("creating the Node");
        let status = serde_json::json!({ "status": { "conditions": [{
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "kubelet is posting ready status",
            "lastHeartbeatTime": "2021-01-02T03:04:05Z",
            "lastTransitionTime": "2021-01-01T00:00:00Z",
        }]}});
        let params = PatchParams {
            field_manager: Some("kubelet".into()),
            ..Default::default()
        };
        nodes
            .patch_status(name, &params, &Patch::Strategic(&status))
            .await
            .expect("setting the Node's Ready condition")
    }

    /// Applies `deploy/kubernetes/rbac.yaml` (service account, ClusterRole, binding).
    pub fn apply_rbac(&self) {
        let rbac = repo_root().join("deploy/kubernetes/rbac.yaml");
        let out = self.kubectl(&["apply", "-f", rbac.to_str().expect("UTF-8 path")]);
        assert!(
            out.status.success(),
            "kubectl apply -f {} failed:\n{}",
            rbac.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Applies the shipped RBAC, mints a token for npd's service account (TokenRequest API,
    /// valid one hour) and writes a kubeconfig using it. Returns the kubeconfig's path.
    pub async fn service_account_kubeconfig(&self) -> PathBuf {
        self.apply_rbac();
        self.kubeconfig_for(SERVICE_ACCOUNT).await
    }

    /// Mints a token for the service account `account` (namespace, name), which must exist
    /// (TokenRequest API, valid one hour), and writes a kubeconfig using it. Returns the
    /// kubeconfig's path (`<namespace>-<name>.kubeconfig` in the cluster directory, except
    /// for npd's own: `npd-service-account.kubeconfig`).
    pub async fn kubeconfig_for(&self, account: (&str, &str)) -> PathBuf {
        let token = self.token_for(account).await;
        let file = if account == SERVICE_ACCOUNT {
            "npd-service-account.kubeconfig".to_owned()
        } else {
            format!("{}-{}.kubeconfig", account.0, account.1)
        };
        let path = self.dir.join(file);
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    \
             server: \"{}\"\n    certificate-authority: \"{}\"\nusers:\n- name: {user}\n  user:\n    \
             token: \"{token}\"\ncontexts:\n- name: {user}\n  context:\n    cluster: test\n    \
             user: {user}\ncurrent-context: {user}\n",
            self.url,
            self.ca_file.display(),
            user = account.1,
        );
        std::fs::write(&path, kubeconfig).expect("writing the service account kubeconfig");
        path
    }

    /// What a pod of npd's service account finds in
    /// `/var/run/secrets/kubernetes.io/serviceaccount` (`token`, `ca.crt`, `namespace`), in a
    /// directory to mount there, and the environment kubelet gives it
    /// (`KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT`): in-cluster configuration for a
    /// container that runs on this host's network.
    pub async fn in_cluster(&self) -> (PathBuf, Vec<(String, String)>) {
        let token = self.service_account_token().await;
        let dir = self.dir.join("serviceaccount");
        std::fs::create_dir_all(&dir).expect("creating the service account directory");
        std::fs::write(dir.join("token"), token).expect("writing the token");
        std::fs::copy(&self.ca_file, dir.join("ca.crt")).expect("copying the CA");
        std::fs::write(dir.join("namespace"), SERVICE_ACCOUNT.0).expect("writing the namespace");
        let authority = self
            .url
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned();
        let (host, port) = authority
            .rsplit_once(':')
            .expect("the API server URL has a port");
        let env = vec![
            ("KUBERNETES_SERVICE_HOST".to_owned(), host.to_owned()),
            ("KUBERNETES_SERVICE_PORT".to_owned(), port.to_owned()),
        ];
        (dir, env)
    }

    /// Applies the shipped RBAC and mints a token for npd's service account (TokenRequest
    /// API, valid one hour).
    async fn service_account_token(&self) -> String {
        self.apply_rbac();
        self.token_for(SERVICE_ACCOUNT).await
    }

    /// Mints a token for the service account `account` (namespace, name) with the
    /// TokenRequest API, valid one hour.
    pub async fn token_for(&self, account: (&str, &str)) -> String {
        let client = self.admin_client().await;
        let (namespace, name) = account;
        let accounts: Api<ServiceAccount> = Api::namespaced(client, namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                expiration_seconds: Some(3600),
                ..Default::default()
            }),
            ..Default::default()
        };
        let minted: TokenRequest = accounts
            .create_subresource("token", name, &PostParams::default(), &request)
            .await
            .unwrap_or_else(|e| panic!("TokenRequest for service account {namespace}/{name}: {e}"));
        minted
            .status
            .and_then(|s| s.token)
            .expect("a token in the TokenRequest status")
    }

    /// Applies `manifest` (YAML, one or more objects) with `kubectl apply`; the objects are
    /// deleted again when the returned guard is dropped. `name` names its file in the cluster
    /// directory.
    pub fn apply(&self, name: &str, manifest: &str) -> Applied {
        let file = self.dir.join(format!("{name}.yaml"));
        std::fs::write(&file, manifest)
            .unwrap_or_else(|e| panic!("writing {}: {e}", file.display()));
        // Guarded before applying: a partly applied manifest is deleted too.
        let applied = Applied {
            kubeconfig: self.kubeconfig.clone(),
            file,
        };
        let out = self.kubectl(&["apply", "-f", applied.file.to_str().expect("UTF-8 path")]);
        assert!(
            out.status.success(),
            "kubectl apply -f {} failed:\n{}",
            applied.file.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        applied
    }
}

/// Objects applied by [`ApiServer::apply`], deleted on drop.
pub struct Applied {
    kubeconfig: PathBuf,
    file: PathBuf,
}

impl Drop for Applied {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["delete", "--ignore-not-found", "--wait=false", "-f"])
            .arg(&self.file)
            .output();
        let _ = std::fs::remove_file(&self.file);
    }
}

/// A validating admission webhook (`tests/k8s/webhook.py`) registered with an API server:
/// the server rejects with 422 every nodes/status write with a condition of type `marker` and
/// every Event with reason `marker`. Removed (and its process stopped) on drop.
pub struct RejectingWebhook {
    kubeconfig: PathBuf,
    child: std::process::Child,
}

/// The name of the webhook configuration [`RejectingWebhook`] registers.
const WEBHOOK: &str = "npd-test-reject";

impl ApiServer {
    /// Registers a [`RejectingWebhook`] for `marker` and waits until the server applies it.
    pub async fn reject_with_422(&self, marker: &str) -> RejectingWebhook {
        let dir = &self.dir;
        let openssl = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("running openssl");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        std::fs::write(dir.join("webhook.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        openssl(&[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "webhook.key",
            "-subj",
            "/CN=npd-test-webhook",
            "-out",
            "webhook.csr",
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            "webhook.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "webhook.ext",
            "-out",
            "webhook.crt",
        ]);
        let port_file = dir.join("webhook.port");
        let _ = std::fs::remove_file(&port_file);
        let child = Command::new("python3")
            .arg(repo_root().join("tests/k8s/webhook.py"))
            .args(["webhook.crt", "webhook.key", marker])
            .arg(&port_file)
            .current_dir(dir)
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting tests/k8s/webhook.py (python3)");
        let guard = RejectingWebhook {
            kubeconfig: self.kubeconfig.clone(),
            child,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                break p.trim().to_owned();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the webhook did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        let ca = Command::new("openssl")
            .args(["base64", "-A", "-in"])
            .arg(&self.ca_file)
            .output()
            .expect("openssl base64");
        let ca = String::from_utf8_lossy(&ca.stdout).trim().to_owned();
        let config = format!(
            "apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingWebhookConfiguration\n\
             metadata: {{name: {WEBHOOK}}}\nwebhooks:\n- name: reject.npd.test\n  clientConfig:\n    \
             url: https://127.0.0.1:{port}/validate\n    caBundle: {ca}\n  rules:\n  - apiGroups: [\"\"]\n    \
             apiVersions: [v1]\n    operations: [CREATE, UPDATE]\n    resources: [events, nodes/status]\n  \
             admissionReviewVersions: [v1]\n  sideEffects: None\n  failurePolicy: Fail\n  timeoutSeconds: 5\n"
        );
        let file = dir.join("webhook.yaml");
        std::fs::write(&file, config).unwrap();
        let out = self.kubectl(&["apply", "-f", file.to_str().expect("UTF-8 path")]);
        assert!(
            out.status.success(),
            "registering the webhook: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Applied once an Event with the marker is refused.
        let events: Api<k8s_openapi::api::core::v1::Event> =
            Api::namespaced(self.admin_client().await, "default");
        for i in 0.. {
            let probe: k8s_openapi::api::core::v1::Event =
                serde_json::from_value(serde_json::json!({
                    "metadata": {"name": format!("npd-webhook-probe-{i}")},
                    "involvedObject": {"kind": "Node", "name": "probe"},
                    "reason": marker,
                }))
                .unwrap();
            match events.create(&PostParams::default(), &probe).await {
                Err(kube::Error::Api(s)) if s.code == 422 => break,
                _ => {}
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the webhook is not applied"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        guard
    }
}

impl Drop for RejectingWebhook {
    fn drop(&mut self) {
        let _ = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args([
                "delete",
                "validatingwebhookconfiguration",
                WEBHOOK,
                "--ignore-not-found",
            ])
            .output();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if self.owned {
            self.down();
        }
    }
}

/// A kube client for the kubeconfig at `path`.
pub async fn client_from_kubeconfig(path: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("reading a kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("loading a kubeconfig");
    Client::try_from(config).expect("creating a kube client")
}

/// Why kube-apiserver cannot be built on this machine, if it cannot: no cached binary and no
/// way to install the build tools.
fn cannot_build_reason() -> Option<String> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let cache = std::env::var_os("NPD_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cache/npd"));
    let cached = std::fs::read_dir(&cache)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("kube-apiserver-")
                && e.path().join("kube-apiserver").is_file()
        });
    if cached {
        return None;
    }
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("apt-get") {
        return Some("no cached kube-apiserver and no apt-get to build one".into());
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let sudo = || {
        Command::new("sudo")
            .args(["-n", "true"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let tools = [
        "go",
        "make",
        "rsync",
        "etcd",
        "dpkg-source",
        "openssl",
        "curl",
    ];
    if !root && !sudo() && !tools.iter().all(|t| have(t)) {
        return Some(
            "no cached kube-apiserver, and neither root nor password-less sudo to install \
             the build tools (run tests/k8s/build-kube-apiserver.sh once as root)"
                .into(),
        );
    }
    None
}
