//! The Helm chart `deploy/helm/npd`: `helm lint`, `helm template` with the defaults and with
//! every optional part on, both renderings through `kubectl apply --dry-run=server` against
//! the real test kube-apiserver (with prometheus-operator's ServiceMonitor and PrometheusRule
//! CRDs installed there), `promtool check rules` on the PrometheusRule's rules and on the
//! dashboard's queries, the values honoured, and the two copies kept in step with their
//! sources: `deploy/kubernetes/` (rendered from the chart) and the chart's default rules
//! (config/*.json).
//!
//! No root and no kernel: these tests only need helm (installed into the cache by
//! `deploy/helm/install-helm.sh`), the test API server, kubectl and promtool.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    process::Command,
    sync::OnceLock,
};

use npd_tests::{
    apiserver::{ApiServer, repo_root},
    helm,
    kernel::TempDir,
    prerequisite, prometheus,
};
use serde_json::{Value, json};

/// Every optional part on.
const ALL_ON: [&str; 6] = [
    "--set",
    "metrics.serviceMonitor.enabled=true",
    "--set",
    "metrics.prometheusRule.enabled=true",
    "--set",
    "metrics.grafanaDashboard.enabled=true",
];

/// The default rule files in the order the agent embeds them.
const DEFAULT_RULE_FILES: [&str; 4] = [
    "kernel-monitor.json",
    "readonly-monitor.json",
    "kernel-monitor-current.json",
    "structured.json",
];

fn have_helm(test: &str) -> bool {
    prerequisite(test, helm::ensure_installed().map(drop))
}

fn render(args: &[&str]) -> String {
    helm::template(args).unwrap_or_else(|e| panic!("helm template {args:?} failed:\n{e}"))
}

/// The kinds and names of the objects in a rendering (`Kind/name` per `---` document).
fn objects(yaml: &str) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    for doc in yaml.split("\n---") {
        let field = |key: &str, indent: &str| {
            doc.lines()
                .find_map(|l| l.strip_prefix(&format!("{indent}{key}: ")))
                .map(|v| v.trim().trim_matches('"').to_owned())
        };
        if let (Some(kind), Some(name)) = (field("kind", ""), field("name", "  ")) {
            set.insert(format!("{kind}/{name}"));
        }
    }
    set
}

/// The test API server with the prometheus-operator CRDs installed (once per process).
fn server_with_crds(test: &str) -> Option<&'static ApiServer> {
    let server = ApiServer::shared(test)?;
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        let crds = helm::prometheus_operator_crds()?;
        let dir = TempDir::new("npd-crds");
        let mut names = Vec::new();
        for crd in &crds {
            let text = std::fs::read_to_string(crd)
                .map_err(|e| format!("reading {}: {e}", crd.display()))?;
            // Kubernetes 1.20 (the test API server) reads a CRD's `default: ''` as null and
            // refuses the CRD ("default: Invalid value: \"null\""); later releases accept it.
            // Only these defaulting lines go: every type, pattern, enum and required field of
            // the schema stays.
            let text: String = text
                .lines()
                .filter(|l| l.trim() != "default: ''")
                .map(|l| format!("{l}\n"))
                .collect();
            let name = crd
                .file_name()
                .and_then(|n| n.to_str())
                .expect("a file name")
                .to_owned();
            std::fs::write(dir.join(&name), text).map_err(|e| format!("writing {name}: {e}"))?;
            names.push(format!(
                "crd/{}",
                name.strip_suffix(".yaml").expect("a .yaml file")
            ));
        }
        let out = server.kubectl(&["apply", "-f", dir.0.to_str().expect("UTF-8 path")]);
        if !out.status.success() {
            return Err(format!(
                "installing the prometheus-operator CRDs: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let mut wait = vec!["wait", "--for", "condition=established", "--timeout=60s"];
        wait.extend(names.iter().map(String::as_str));
        let out = server.kubectl(&wait);
        if !out.status.success() {
            return Err(format!(
                "the CRDs are not established: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    });
    prerequisite(test, installed.clone()).then_some(server)
}

/// `kubectl apply --dry-run=server -o json` of `yaml`: the objects as the API server would
/// store them (validated against its schemas, the CRDs' included), or kubectl's error.
fn try_dry_run(server: &ApiServer, yaml: &str) -> Result<Vec<Value>, String> {
    let dir = TempDir::new("npd-chart");
    let file = dir.join("rendered.yaml");
    std::fs::write(&file, yaml).expect("writing the rendering");
    let out = server.kubectl(&[
        "apply",
        "--dry-run=server",
        "-o",
        "json",
        "-f",
        file.to_str().expect("UTF-8 path"),
    ]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let v: Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("kubectl -o json: {e}"))?;
    Ok(match v["kind"].as_str() {
        Some("List") => v["items"].as_array().cloned().unwrap_or_default(),
        _ => vec![v],
    })
}

fn dry_run(server: &ApiServer, yaml: &str) -> Vec<Value> {
    try_dry_run(server, yaml)
        .unwrap_or_else(|e| panic!("kubectl apply --dry-run=server failed:\n{e}\n{yaml}"))
}

/// The object of `kind` (and `name`, when given) among `objects`.
fn find<'a>(objects: &'a [Value], kind: &str, name: Option<&str>) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && name.is_none_or(|n| o["metadata"]["name"] == n))
        .unwrap_or_else(|| {
            let have: Vec<String> = objects
                .iter()
                .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
                .collect();
            panic!("no {kind} {name:?} among {have:?}")
        })
}

fn container(objects: &[Value]) -> &Value {
    &find(objects, "DaemonSet", None)["spec"]["template"]["spec"]["containers"][0]
}

fn args(objects: &[Value]) -> Vec<String> {
    container(objects)["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("a string").to_owned())
        .collect()
}

/// Runs `promtool check rules` on `rules` (a rule file's content): exit code and output.
fn promtool_check_rules(rules: &Value) -> (i32, String) {
    let dir = TempDir::new("npd-rules");
    let file = dir.join("rules.json");
    std::fs::write(&file, serde_json::to_vec_pretty(rules).unwrap()).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("running promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The problem reasons and the (condition, reason) pairs of the default rule files.
fn default_problems() -> (BTreeSet<String>, BTreeSet<(String, String)>) {
    let mut reasons = BTreeSet::new();
    let mut conditions = BTreeSet::new();
    for file in config_files() {
        let text = std::fs::read_to_string(repo_root().join("config").join(&file)).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        for rule in v["rules"].as_array().into_iter().flatten() {
            let reason = rule["reason"].as_str().expect("a reason").to_owned();
            if rule["type"] == "permanent" {
                let condition = rule["condition"].as_str().expect("a condition").to_owned();
                conditions.insert((condition, reason.clone()));
            }
            reasons.insert(reason);
        }
    }
    (reasons, conditions)
}

/// The names of config/*.json.
fn config_files() -> BTreeSet<String> {
    json_files(&repo_root().join("config"))
}

fn json_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f.ends_with(".json"))
        .collect()
}

/// The metric names (`npd_*`, `problem_*`) a PromQL expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let start_ok = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == '_');
        let rest: String = bytes[i..].iter().collect();
        if start_ok && (rest.starts_with("npd_") || rest.starts_with("problem_")) {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            i += name.len();
            names.insert(name);
        } else {
            i += 1;
        }
    }
    names
}

/// Asserts that README's metrics section names every metric in `exprs` (a histogram by its
/// base name).
fn assert_metrics_documented(what: &str, exprs: &[String]) {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).expect("README.md");
    let section = readme
        .split("### Metrics, health and logs")
        .nth(1)
        .and_then(|s| s.split("\n### ").next())
        .expect("README has a section \"Metrics, health and logs\"");
    let mut used = BTreeSet::new();
    for expr in exprs {
        used.extend(metric_names(expr));
    }
    assert!(!used.is_empty(), "{what}: no npd metric used");
    for name in used {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            section.contains(&format!("`{base}`")) || section.contains(&format!("`{base}{{")),
            "{what} uses {name}, which README's metrics section does not list"
        );
    }
}

#[test]
fn helm_lint_passes_with_the_defaults_and_every_optional_part() {
    if !have_helm("helm_lint_passes_with_the_defaults_and_every_optional_part") {
        return;
    }
    let chart = helm::chart_dir();
    let chart = chart.to_str().unwrap();
    for extra in [&[][..], &ALL_ON[..]] {
        let mut args = vec!["lint", "--strict", chart];
        args.extend_from_slice(extra);
        let out = helm::helm(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "helm {args:?} failed:\n{text}");
        assert!(
            text.contains("1 chart(s) linted, 0 chart(s) failed"),
            "helm {args:?}:\n{text}"
        );
    }
}

#[test]
fn defaults_render_the_core_objects_and_every_optional_part_renders_when_on() {
    if !have_helm("defaults_render_the_core_objects_and_every_optional_part_renders_when_on") {
        return;
    }
    let core: BTreeSet<String> = [
        "ServiceAccount/npd",
        "ClusterRole/npd",
        "ClusterRoleBinding/npd",
        "ConfigMap/npd-config",
        "DaemonSet/npd",
        "Service/npd-metrics",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(objects(&render(&[])), core, "the default rendering");
    let mut all = core.clone();
    all.extend(
        [
            "ServiceMonitor/npd",
            "PrometheusRule/npd",
            "ConfigMap/npd-dashboard",
        ]
        .into_iter()
        .map(String::from),
    );
    assert_eq!(
        objects(&render(&ALL_ON)),
        all,
        "the rendering with every optional part on"
    );
}

#[test]
fn both_renderings_pass_server_side_dry_run() {
    let test = "both_renderings_pass_server_side_dry_run";
    if !have_helm(test) {
        return;
    }
    let Some(server) = server_with_crds(test) else {
        return;
    };
    for (what, args) in [("defaults", &[][..]), ("every optional part", &ALL_ON[..])] {
        let yaml = render(args);
        let stored = dry_run(server, &yaml);
        let sent = objects(&yaml);
        let accepted: BTreeSet<String> = stored
            .iter()
            .map(|o| {
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect();
        assert_eq!(accepted, sent, "{what}: what the API server accepted");
    }
    // The CRDs' schemas are enforced: a ServiceMonitor with an interval that is no duration
    // is refused (the same check that accepted the chart's).
    let bad = render(&[
        "--set",
        "metrics.serviceMonitor.enabled=true",
        "--set",
        "metrics.serviceMonitor.interval=often",
        "--show-only",
        "templates/servicemonitor.yaml",
    ]);
    let refused = try_dry_run(server, &bad).expect_err("a ServiceMonitor with interval=often");
    assert!(refused.contains("interval"), "{refused}");
}

#[test]
fn prometheus_rule_passes_promtool_and_alerts_on_every_default_reason() {
    let test = "prometheus_rule_passes_promtool_and_alerts_on_every_default_reason";
    if !have_helm(test) || !prerequisite(test, prometheus::ensure_installed()) {
        return;
    }
    let Some(server) = server_with_crds(test) else {
        return;
    };
    let stored = dry_run(
        server,
        &render(&[
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--show-only",
            "templates/prometheusrule.yaml",
        ]),
    );
    let groups = find(&stored, "PrometheusRule", Some("npd"))["spec"]["groups"].clone();
    let rules: Vec<Value> = groups
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect();
    let (code, text) = promtool_check_rules(&json!({ "groups": groups }));
    assert_eq!(code, 0, "promtool check rules:\n{text}");
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "{text}"
    );

    let exprs: BTreeMap<String, String> = rules
        .iter()
        .map(|r| {
            (
                r["alert"].as_str().expect("only alerts").to_owned(),
                r["expr"].as_str().expect("an expr").to_owned(),
            )
        })
        .collect();
    let (reasons, conditions) = default_problems();
    for reason in &reasons {
        let alert = format!("NodeProblem{reason}");
        let expr = exprs
            .get(&alert)
            .unwrap_or_else(|| panic!("no alert {alert} for reason {reason}"));
        assert!(
            expr.starts_with(&format!("increase(problem_counter{{reason=\"{reason}\"}}[")),
            "{alert}: {expr}"
        );
    }
    for (condition, reason) in &conditions {
        let alert = format!("NodeProblemGauge{reason}");
        assert_eq!(
            exprs.get(&alert).map(String::as_str),
            Some(format!("problem_gauge{{type=\"{condition}\",reason=\"{reason}\"}} > 0").as_str()),
            "{alert}"
        );
    }
    for (alert, metric) in [
        ("NpdKernelEventsLost", "npd_kernel_events_lost_total"),
        ("NpdKmsgRecordsLost", "npd_kmsg_records_lost_total"),
        ("NpdSensorNotReading", "npd_sensor_reading == 0"),
        ("NpdApiServerUnavailable", "npd_k8s_api_available == 0"),
    ] {
        let expr = exprs
            .get(alert)
            .unwrap_or_else(|| panic!("no alert {alert}"));
        assert!(expr.contains(metric), "{alert}: {expr}");
    }
    assert_metrics_documented(
        "the PrometheusRule",
        &exprs.values().cloned().collect::<Vec<_>>(),
    );

    // promtool does refuse a broken rule: the check above can fail.
    let mut broken = rules[0].clone();
    broken["expr"] = json!("increase(problem_counter{reason=\"KernelOops\"}[5m]) >");
    let (code, text) =
        promtool_check_rules(&json!({"groups": [{"name": "broken", "rules": [broken]}]}));
    assert_ne!(code, 0, "promtool accepted a broken expression:\n{text}");

    // An alert left out by name is gone; the others stay.
    let yaml = render(&[
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--set",
        "metrics.prometheusRule.defaultRules.disabled={NodeProblemExt4Warning}",
        "--show-only",
        "templates/prometheusrule.yaml",
    ]);
    assert!(!yaml.contains("alert: NodeProblemExt4Warning"), "{yaml}");
    assert!(yaml.contains("alert: NodeProblemExt4Error"), "{yaml}");
}

#[test]
fn dashboard_queries_are_valid_promql_on_documented_metrics() {
    let test = "dashboard_queries_are_valid_promql_on_documented_metrics";
    if !have_helm(test) || !prerequisite(test, prometheus::ensure_installed()) {
        return;
    }
    let Some(server) = server_with_crds(test) else {
        return;
    };
    let stored = dry_run(
        server,
        &render(&[
            "--set",
            "metrics.grafanaDashboard.enabled=true",
            "--show-only",
            "templates/dashboard.yaml",
        ]),
    );
    let configmap = find(&stored, "ConfigMap", Some("npd-dashboard"));
    assert_eq!(configmap["metadata"]["labels"]["grafana_dashboard"], "1");
    let dashboard: Value = serde_json::from_str(
        configmap["data"]["npd.json"]
            .as_str()
            .expect("npd.json in the ConfigMap"),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    let mut titles = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        titles.push(panel["title"].as_str().unwrap_or_default().to_owned());
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push(target["expr"].as_str().expect("an expr").to_owned());
        }
    }
    // Grafana's variables, as Grafana would substitute them.
    let concrete = |e: &str| {
        e.replace("$__rate_interval", "4m")
            .replace("$__range", "6h")
            .replace("$node", ".*")
    };
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| json!({"record": format!("dashboard:query_{i}"), "expr": concrete(e)}))
        .collect();
    let (code, text) =
        promtool_check_rules(&json!({"groups": [{"name": "dashboard", "rules": rules}]}));
    assert_eq!(code, 0, "the dashboard's queries:\n{text}");

    // What the dashboard must show.
    let all = exprs.join("\n");
    for (what, needle) in [
        (
            "problems per node and reason",
            "sum by (node, reason) (increase(problem_counter",
        ),
        ("True conditions", "problem_gauge{node=~\"$node\"} == 1"),
        ("kernel events lost", "npd_kernel_events_lost_total"),
        ("/dev/kmsg records lost", "npd_kmsg_records_lost_total"),
        ("API latency", "npd_k8s_api_call_duration_seconds_bucket"),
    ] {
        assert!(
            all.contains(needle),
            "the dashboard lacks {what} ({needle})"
        );
    }
    let mut documented = exprs.clone();
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(q) = var["definition"].as_str() {
            documented.push(q.to_owned());
        }
    }
    assert_metrics_documented("the dashboard", &documented);
    assert!(
        titles.iter().any(|t| t.contains("True conditions")),
        "{titles:?}"
    );
}

#[test]
fn committed_manifests_equal_a_fresh_rendering() {
    let test = "committed_manifests_equal_a_fresh_rendering";
    if !have_helm(test) {
        return;
    }
    let out = TempDir::new("npd-manifests");
    let script = repo_root().join("deploy/helm/render-manifests.sh");
    let run = Command::new(&script)
        .arg(&out.0)
        .env("HELM", helm::ensure_installed().unwrap())
        .output()
        .expect("running render-manifests.sh");
    assert!(
        run.status.success(),
        "{} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&run.stderr)
    );
    let committed_dir = repo_root().join("deploy/kubernetes");
    let files = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|f| f.ends_with(".yaml"))
            .collect()
    };
    let fresh = files(&out.0);
    assert_eq!(
        files(&committed_dir),
        fresh,
        "deploy/kubernetes/ has other files than the chart renders: run deploy/helm/render-manifests.sh"
    );
    for f in &fresh {
        let committed = std::fs::read_to_string(committed_dir.join(f)).unwrap();
        let rendered = std::fs::read_to_string(out.join(f)).unwrap();
        assert!(
            committed == rendered,
            "deploy/kubernetes/{f} differs from the chart's rendering: run deploy/helm/render-manifests.sh\n--- committed\n{committed}\n--- rendered\n{rendered}"
        );
    }
    for core in [
        "rbac.yaml",
        "configmap.yaml",
        "daemonset.yaml",
        "service.yaml",
    ] {
        assert!(fresh.contains(core), "{core} not rendered: {fresh:?}");
    }
}

#[test]
fn the_charts_default_rules_are_config() {
    let chart_rules = helm::chart_dir().join("files/rules");
    let config = repo_root().join("config");
    let files = config_files();
    assert!(!files.is_empty(), "no rule files in config/");
    assert_eq!(
        json_files(&chart_rules),
        files,
        "deploy/helm/npd/files/rules/ is not config/*.json: run deploy/helm/render-manifests.sh"
    );
    for f in &files {
        let copy = std::fs::read(chart_rules.join(f)).unwrap();
        let source = std::fs::read(config.join(f)).unwrap();
        assert!(
            copy == source,
            "deploy/helm/npd/files/rules/{f} differs from config/{f}: run deploy/helm/render-manifests.sh"
        );
    }
}

#[test]
fn the_daemonset_keeps_its_privileges_mounts_probes_and_args() {
    let test = "the_daemonset_keeps_its_privileges_mounts_probes_and_args";
    if !have_helm(test) {
        return;
    }
    let Some(server) = server_with_crds(test) else {
        return;
    };
    let stored = dry_run(server, &render(&[]));
    let ds = find(&stored, "DaemonSet", Some("npd"));
    let pod = &ds["spec"]["template"]["spec"];
    let c = container(&stored);

    // Everywhere, as the node's most critical pods.
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    // Capabilities, never privileged.
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    // The smallest set that works (the container test runs the image with it), with the
    // seccomp profile it needs stated.
    assert_eq!(sc["capabilities"]["add"], json!(["BPF", "PERFMON"]));
    assert_eq!(sc["seccompProfile"]["type"], "Unconfined");
    // Older kernels and hosts without tracefs opt in to more.
    let older = dry_run(
        server,
        &render(&["--set", "extraCapabilities={SYS_ADMIN,SYS_RESOURCE,BPF}"]),
    );
    assert_eq!(
        container(&older)["securityContext"]["capabilities"]["add"],
        json!(["BPF", "PERFMON", "SYS_ADMIN", "SYS_RESOURCE"])
    );
    // The host paths the sensor reads, and the rules ConfigMap at /etc/npd.
    let volumes: BTreeMap<String, Value> = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap().to_owned(), v.clone()))
        .collect();
    let mounts: BTreeMap<String, String> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["mountPath"].as_str().unwrap().to_owned(),
                m["name"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for (path, kind) in [
        ("/sys/kernel/tracing", "Directory"),
        ("/dev/kmsg", "CharDevice"),
        ("/sys/kernel/btf", "Directory"),
        ("/sys/dev/block", "Directory"),
    ] {
        let name = mounts
            .get(path)
            .unwrap_or_else(|| panic!("nothing mounted at {path}: {mounts:?}"));
        assert_eq!(volumes[name]["hostPath"]["path"], path);
        assert_eq!(volumes[name]["hostPath"]["type"], kind);
    }
    assert_eq!(
        volumes[&mounts["/etc/npd"]]["configMap"]["name"],
        "npd-config"
    );
    // NODE_NAME from the pod's node.
    assert_eq!(
        c["env"][0],
        json!({"name": "NODE_NAME", "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}})
    );
    // Probes on the health port.
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "health");
    assert_eq!(c["livenessProbe"]["tcpSocket"]["port"], "health");
    assert_eq!(c["resources"]["limits"]["memory"], "64Mi");
    // The agent, its rule files in the order it embeds them, listening on the pod IP.
    assert_eq!(c["command"], json!(["/npd-agent"]));
    let mut expected = vec!["run".to_owned()];
    expected.extend(
        DEFAULT_RULE_FILES
            .iter()
            .map(|f| format!("--config=/etc/npd/{f}")),
    );
    expected.extend([
        "--address=0.0.0.0".into(),
        "--prometheus-address=0.0.0.0".into(),
        // Pod attribution reads the host's processes and mount table.
        "--host-proc=/host/proc".into(),
    ]);
    assert_eq!(args(&stored), expected);
    // The ConfigMap carries every default rule file, byte for byte (tabs as 4 spaces).
    let cm = find(&stored, "ConfigMap", Some("npd-config"));
    for f in config_files() {
        let source = std::fs::read_to_string(repo_root().join("config").join(&f)).unwrap();
        assert_eq!(
            cm["data"][&f].as_str().map(str::trim_end),
            Some(source.replace('\t', "    ").trim_end()),
            "{f} in the ConfigMap"
        );
    }
    // The service account is the one bound to the role; the Service selects these pods.
    let sa = pod["serviceAccountName"].as_str().unwrap();
    let binding = find(&stored, "ClusterRoleBinding", Some("npd"));
    assert_eq!(binding["subjects"][0]["name"], sa);
    assert_eq!(binding["subjects"][0]["namespace"], "kube-system");
    let service = find(&stored, "Service", Some("npd-metrics"));
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (k, v) in service["spec"]["selector"].as_object().unwrap() {
        assert_eq!(&labels[k], v, "the Service selects {k}={v}");
    }
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
}

#[test]
fn custom_rule_files_load_next_to_the_defaults_or_alone() {
    let test = "custom_rule_files_load_next_to_the_defaults_or_alone";
    if !have_helm(test) {
        return;
    }
    let Some(server) = server_with_crds(test) else {
        return;
    };
    let dir = TempDir::new("npd-values");
    let disk = r#"{"source": "disk-monitor", "conditions": [{"type": "DiskBroken", "reason": "DiskIsFine", "message": "ok"}], "rules": [{"type": "temporary", "reason": "DiskWriteError", "event": "block_error", "message": "write error on {device}"}, {"type": "permanent", "condition": "DiskBroken", "reason": "DiskGone", "event": "block_error", "message": "gone"}]}"#;
    let values = |defaults: bool| {
        let file = dir.join(&format!("values-{defaults}.json"));
        let v = json!({
            "settings": {
                "default_monitors": defaults,
                "custom_monitor_definitions": { "disk-monitor.json": disk },
                "log_monitors": ["/config/kernel-monitor.json"],
            },
            "metrics": { "prometheusRule": { "enabled": true } },
        });
        std::fs::write(&file, v.to_string()).unwrap();
        file
    };

    // Next to the defaults: defaults first, then the custom file, then the paths.
    let with = values(true);
    let stored = dry_run(server, &render(&["-f", with.to_str().unwrap()]));
    let a = args(&stored);
    let mut expected: Vec<String> = DEFAULT_RULE_FILES
        .iter()
        .map(|f| format!("--config=/etc/npd/{f}"))
        .collect();
    expected.push("--config=/etc/npd/disk-monitor.json".into());
    expected.push("--config=/config/kernel-monitor.json".into());
    assert_eq!(a[1..=expected.len()], expected[..], "{a:?}");
    let cm = find(&stored, "ConfigMap", Some("npd-config"));
    assert_eq!(
        cm["data"]["disk-monitor.json"].as_str().map(str::trim_end),
        Some(disk)
    );
    assert_eq!(
        cm["data"].as_object().unwrap().len(),
        DEFAULT_RULE_FILES.len() + 1
    );
    let rules = find(&stored, "PrometheusRule", Some("npd")).to_string();
    for alert in [
        "NodeProblemDiskWriteError",
        "NodeProblemGaugeDiskGone",
        "NodeProblemOOMKilling",
    ] {
        assert!(rules.contains(alert), "{alert} missing: {rules}");
    }

    // Alone: the defaults are neither shipped nor loaded, nor alerted on.
    let alone = values(false);
    let stored = dry_run(server, &render(&["-f", alone.to_str().unwrap()]));
    let a = args(&stored);
    assert_eq!(
        a[..3],
        [
            "run".to_owned(),
            "--config=/etc/npd/disk-monitor.json".into(),
            "--config=/config/kernel-monitor.json".into()
        ],
        "{a:?}"
    );
    let cm = find(&stored, "ConfigMap", Some("npd-config"));
    assert_eq!(
        cm["data"].as_object().unwrap().keys().collect::<Vec<_>>(),
        ["disk-monitor.json"]
    );
    let rules = find(&stored, "PrometheusRule", Some("npd")).to_string();
    assert!(rules.contains("NodeProblemDiskWriteError"), "{rules}");
    assert!(!rules.contains("NodeProblemOOMKilling"), "{rules}");

    // A custom file named like a default replaces it, in its place.
    let mine = dir.join("values-replace.json");
    let v = json!({"settings": {"custom_monitor_definitions": {
        "readonly-monitor.json": r#"{"source": "mine", "rules": []}"#,
    }}});
    std::fs::write(&mine, v.to_string()).unwrap();
    let replaced = render(&[
        "-f",
        mine.to_str().unwrap(),
        "--show-only",
        "templates/configmap.yaml",
    ]);
    assert!(
        replaced.contains("readonly-monitor.json: |\n    {\"source\": \"mine\", \"rules\": []}"),
        "{replaced}"
    );
    assert!(!replaced.contains("FilesystemIsReadOnly"), "{replaced}");

    // Dropping the defaults with nothing in their place is refused: the agent would fall
    // back to its embedded defaults.
    let refused = helm::template(&["--set", "settings.default_monitors=false"])
        .expect_err("default_monitors=false and no rule file");
    assert!(refused.contains("no rule file is given"), "{refused}");
    // Only paths: no ConfigMap, nothing mounted at /etc/npd.
    let yaml = render(&[
        "--set",
        "settings.default_monitors=false",
        "--set",
        "settings.log_monitors={/config/kernel-monitor.json}",
    ]);
    assert!(!objects(&yaml).contains("ConfigMap/npd-config"), "{yaml}");
    assert!(!yaml.contains("/etc/npd"), "{yaml}");
    dry_run(server, &yaml);
}

#[test]
fn plugin_monitors_and_their_scripts_install_as_with_deliveryheros_chart() {
    let test = "plugin_monitors_and_their_scripts_install_as_with_deliveryheros_chart";
    if !have_helm(test) {
        return;
    }
    let Some(server) = server_with_crds(test) else {
        return;
    };
    // deliveryhero's way: the plugin config and its script in custom_monitor_definitions, the
    // config named by custom_plugin_monitors at /custom-config/. A second plugin config is
    // loaded as any custom *.json file is.
    let ntp = r#"{"plugin": "custom", "pluginConfig": {"invoke_interval": "30s", "timeout": "5s"}, "source": "ntp-custom-plugin-monitor", "metricsReporting": true, "conditions": [{"type": "NTPProblem", "reason": "NTPIsUp", "message": "ntp service is up"}], "rules": [{"type": "permanent", "condition": "NTPProblem", "reason": "NTPIsDown", "path": "/custom-config/check-ntp.sh", "timeout": "3s"}]}"#;
    let fd = r#"{"plugin": "custom", "source": "fd-monitor", "conditions": [], "rules": [{"type": "temporary", "reason": "FDPressure", "path": "/custom-config/check-fd.sh"}]}"#;
    let script = "#!/bin/sh\nexit 0\n";
    let dir = TempDir::new("npd-values");
    let file = dir.join("values.json");
    let v = json!({
        "settings": {
            "custom_monitor_definitions": {
                "ntp-monitor.json": ntp,
                "fd-monitor.json": fd,
                "check-ntp.sh": script,
                "check-fd.sh": script,
            },
            "custom_plugin_monitors": ["/custom-config/ntp-monitor.json"],
        },
        "metrics": { "prometheusRule": { "enabled": true } },
    });
    std::fs::write(&file, v.to_string()).unwrap();
    let stored = dry_run(server, &render(&["-f", file.to_str().unwrap()]));

    let a = args(&stored);
    assert!(
        a.contains(&"--config.custom-plugin-monitor=/custom-config/ntp-monitor.json".to_owned()),
        "{a:?}"
    );
    assert!(
        a.contains(&"--config=/etc/npd/fd-monitor.json".to_owned()),
        "{a:?}"
    );
    // Named by path, so not loaded a second time; scripts are never loaded as rule files.
    for not in ["ntp-monitor.json", "check-ntp.sh", "check-fd.sh"] {
        assert!(
            !a.iter()
                .any(|arg| arg.ends_with(not) && arg.starts_with("--config=")),
            "{not} in {a:?}"
        );
    }

    let cm = find(&stored, "ConfigMap", Some("npd-config"));
    assert_eq!(cm["data"]["check-ntp.sh"].as_str(), Some(script));
    // One volume, executable, mounted at npd's path and at deliveryhero's.
    let pod = &find(&stored, "DaemonSet", None)["spec"]["template"]["spec"];
    let config = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == "npd-config")
        .expect("the config volume");
    assert_eq!(config["configMap"]["defaultMode"], 0o755);
    let at: BTreeSet<&str> = container(&stored)["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == config["name"])
        .map(|m| m["mountPath"].as_str().unwrap())
        .collect();
    assert_eq!(at, BTreeSet::from(["/etc/npd", "/custom-config"]));

    // The plugin monitors' problems are alerted on like the rule files'.
    let rules = find(&stored, "PrometheusRule", Some("npd")).to_string();
    for alert in ["NodeProblemGaugeNTPIsDown", "NodeProblemFDPressure"] {
        assert!(rules.contains(alert), "{alert} missing: {rules}");
    }

    // Only plugin monitors by path is a valid install, without the defaults.
    let yaml = render(&[
        "--set",
        "settings.default_monitors=false",
        "--set",
        "settings.custom_plugin_monitors={/config/my-plugin.json}",
    ]);
    assert!(
        yaml.contains("--config.custom-plugin-monitor=/config/my-plugin.json"),
        "{yaml}"
    );
}

/// Pod attribution, on by default, is what grants `pods list, watch` and mounts the host's
/// `/proc` read-only; `podAttribution.enabled=false` takes both away and tells the agent.
#[test]
fn pod_attribution_is_the_only_reason_for_pods_access() {
    let test = "pod_attribution_is_the_only_reason_for_pods_access";
    if !have_helm(test) {
        return;
    }
    let Some(server) = server_with_crds(test) else {
        return;
    };
    let pods_rule = |stored: &[Value]| {
        find(stored, "ClusterRole", Some("npd"))["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .find(|r| r["resources"] == json!(["pods"]))
            .cloned()
    };
    let host_proc = |stored: &[Value]| {
        let pod = &find(stored, "DaemonSet", Some("npd"))["spec"]["template"]["spec"];
        let volume = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == "host-proc")
            .cloned();
        let mount = pod["containers"][0]["volumeMounts"]
            .as_array()
            .expect("volumeMounts")
            .iter()
            .find(|m| m["name"] == "host-proc")
            .cloned();
        (volume, mount)
    };
    let on = dry_run(server, &render(&[]));
    assert_eq!(
        pods_rule(&on),
        Some(json!({"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}))
    );
    let (volume, mount) = host_proc(&on);
    assert_eq!(
        volume.expect("the host-proc volume")["hostPath"]["path"],
        "/proc"
    );
    let mount = mount.expect("the host-proc mount");
    assert_eq!(mount["mountPath"], "/host/proc");
    assert_eq!(mount["readOnly"], true);
    assert!(args(&on).contains(&"--host-proc=/host/proc".to_owned()));

    let off = dry_run(server, &render(&["--set", "podAttribution.enabled=false"]));
    assert_eq!(pods_rule(&off), None, "pods access without pod attribution");
    assert_eq!(host_proc(&off), (None, None));
    let a = args(&off);
    assert!(a.contains(&"--pod-attribution=false".to_owned()), "{a:?}");
    assert!(!a.iter().any(|a| a.starts_with("--host-proc")), "{a:?}");

    let elsewhere = dry_run(
        server,
        &render(&["--set", "podAttribution.kubeletRootDir=/data/kubelet"]),
    );
    assert!(args(&elsewhere).contains(&"--kubelet-root-dir=/data/kubelet".to_owned()));
}

#[test]
fn values_an_npd_chart_user_knows_are_honoured() {
    let test = "values_an_npd_chart_user_knows_are_honoured";
    if !have_helm(test) {
        return;
    }
    let Some(server) = server_with_crds(test) else {
        return;
    };
    let dir = TempDir::new("npd-values");
    let file = dir.join("values.json");
    let values = json!({
        "image": {"repository": "registry.example/npd", "tag": "9.9.9", "pullPolicy": "Always"},
        "settings": {"extraArgs": ["--log-format=json"], "port": 30256, "prometheus_port": 30257, "heartBeatPeriod": "5m0s"},
        "extraArgs": ["--log-level=debug"],
        "env": [{"name": "NO_COLOR", "value": "1"}],
        "resources": {"requests": {"cpu": "50m", "memory": "40Mi"}, "limits": {"memory": "80Mi"}},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "npd", "operator": "NotIn", "values": ["off"]}]}]}}},
        "updateStrategy": "RollingUpdate",
        "maxUnavailable": 3,
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}],
        "priorityClassName": "",
        "podAnnotations": {"example.com/note": "hello"},
        "podLabels": {"team": "nodes"},
        "extraVolumes": [{"name": "my-rules", "configMap": {"name": "my-npd-rules"}}],
        "extraVolumeMounts": [{"name": "my-rules", "mountPath": "/etc/npd-custom", "readOnly": true}],
        "serviceAccount": {"create": false, "name": "existing"},
        "rbac": {"create": false},
        "metrics": {"enabled": false},
    });
    std::fs::write(&file, values.to_string()).unwrap();
    let yaml = render(&["-f", file.to_str().unwrap()]);
    let kinds = objects(&yaml);
    assert_eq!(
        kinds,
        ["ConfigMap/npd-config", "DaemonSet/npd"]
            .into_iter()
            .map(String::from)
            .collect(),
        "rbac.create=false, serviceAccount.create=false, metrics.enabled=false"
    );
    let stored = dry_run(server, &yaml);
    let ds = find(&stored, "DaemonSet", Some("npd"));
    let pod = &ds["spec"]["template"]["spec"];
    let c = container(&stored);
    assert_eq!(c["image"], "registry.example/npd:9.9.9");
    assert_eq!(c["imagePullPolicy"], "Always");
    let a = args(&stored);
    for arg in [
        "--port=30256",
        "--prometheus-port=30257",
        "--k8s-exporter-heartbeat-period=5m0s",
        "--log-format=json",
        "--log-level=debug",
    ] {
        assert!(a.contains(&arg.to_owned()), "{arg} not in {a:?}");
    }
    assert_eq!(c["ports"][0]["containerPort"], 30256);
    assert_eq!(c["ports"][1]["containerPort"], 30257);
    assert_eq!(c["env"][1], json!({"name": "NO_COLOR", "value": "1"}));
    assert_eq!(c["resources"], values["resources"]);
    assert_eq!(pod["nodeSelector"], values["nodeSelector"]);
    assert_eq!(pod["affinity"], values["affinity"]);
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 3}})
    );
    assert_eq!(pod["tolerations"], values["tolerations"]);
    assert!(pod.get("priorityClassName").is_none(), "{pod}");
    let meta = &ds["spec"]["template"]["metadata"];
    assert_eq!(meta["annotations"]["example.com/note"], "hello");
    assert_eq!(meta["labels"]["team"], "nodes");
    assert_eq!(pod["serviceAccountName"], "existing");
    assert!(
        pod["volumes"].as_array().unwrap().contains(
            &json!({"name": "my-rules", "configMap": {"name": "my-npd-rules", "defaultMode": 420}})
        ),
        "{}",
        pod["volumes"]
    );
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .contains(&values["extraVolumeMounts"][0]),
        "{}",
        c["volumeMounts"]
    );

    // An image digest wins over the tag; the Kubernetes form of updateStrategy passes as is.
    let yaml = render(&[
        "--set",
        "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "--set",
        "updateStrategy.type=OnDelete",
        "--set",
        "updateStrategy.rollingUpdate=null",
        "--show-only",
        "templates/daemonset.yaml",
    ]);
    assert!(
        yaml.contains("image: \"npd@sha256:0123456789abcdef"),
        "{yaml}"
    );
    assert!(yaml.contains("type: OnDelete"), "{yaml}");

    // values.schema.json refuses a value of the wrong shape instead of rendering nonsense.
    for (set, path) in [
        ("tolerations=everywhere", "/tolerations"),
        (
            "settings.default_monitors=yes",
            "/settings/default_monitors",
        ),
        (
            "settings.prometheus_port=70000",
            "/settings/prometheus_port",
        ),
    ] {
        let refused = helm::template(&["--set", set]).expect_err(set);
        assert!(refused.contains(path), "{set}: {refused}");
    }
}

#[test]
fn helm_install_upgrade_and_uninstall_work_against_the_api_server() {
    let test = "helm_install_upgrade_and_uninstall_work_against_the_api_server";
    if !have_helm(test) {
        return;
    }
    let Some(server) = server_with_crds(test) else {
        return;
    };
    // A release of its own name and namespace: the other tests' objects are `npd` in
    // kube-system.
    let (release, namespace) = ("npd-helm-test", "default");
    let chart = helm::chart_dir();
    let kubeconfig = server.kubeconfig.to_str().expect("UTF-8 path").to_owned();
    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--kubeconfig", &kubeconfig, "--namespace", namespace]);
        let out = helm::helm(&all);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "helm {all:?} failed:\n{text}");
        text
    };
    let chart = chart.to_str().unwrap();
    let installed = run(&["install", release, chart]);
    assert!(installed.contains("STATUS: deployed"), "{installed}");
    let get = |what: &str| {
        server
            .kubectl(&["get", "-n", namespace, what])
            .status
            .success()
    };
    assert!(get("daemonset/npd-helm-test"));
    assert!(get("configmap/npd-helm-test-config"));
    assert!(!get("servicemonitor/npd-helm-test"));

    let mut upgrade = vec!["upgrade", release, chart];
    upgrade.extend_from_slice(&ALL_ON);
    let upgraded = run(&upgrade);
    assert!(upgraded.contains("REVISION: 2"), "{upgraded}");
    for what in [
        "servicemonitor/npd-helm-test",
        "prometheusrule/npd-helm-test",
        "configmap/npd-helm-test-dashboard",
    ] {
        assert!(get(what), "{what} after the upgrade");
    }

    run(&["uninstall", release]);
    assert!(
        !get("daemonset/npd-helm-test"),
        "the DaemonSet outlived uninstall"
    );
    let role = server.kubectl(&["get", "clusterrole/npd-helm-test"]);
    assert!(!role.status.success(), "the ClusterRole outlived uninstall");
}
