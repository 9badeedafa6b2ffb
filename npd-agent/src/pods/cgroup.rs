//! A cgroup path to the pod and container it belongs to, as kubelet lays cgroups out. Pure
//! functions, no I/O: the paths come from the kernel's `oom-kill:` line or from
//! `/proc/<pid>/cgroup`.
//!
//! kubelet's two cgroup drivers, on cgroup v1 (per controller) and v2 (unified) alike:
//!
//! - cgroupfs: `/kubepods/<qos>/pod<uid>/<container-id>`, where `<qos>` is `burstable` or
//!   `besteffort`, and absent for Guaranteed pods (`/kubepods/pod<uid>/<id>`);
//! - systemd: `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/<runtime>-<id>.scope`,
//!   the UID's dashes written as underscores, the qos level again absent for Guaranteed pods
//!   (`/kubepods.slice/kubepods-pod<uid_>.slice/...`), `<runtime>` one of `cri-containerd`,
//!   `crio`, `docker` or `containerd`.
//!
//! The kubepods root may sit below other cgroups (kind and minikube nodes run in a container:
//! `/docker/<id>/kubepods/...`, `/kubelet.slice/kubelet-kubepods.slice/...`), and a reader in a
//! cgroup namespace sees `/../..` in front: the root is found wherever it is. Anything else
//! (system services, processes of no pod, a pod's own cgroup without a container) gives no pod
//! or no container, and is never an error.

/// The pod and container a cgroup path names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupPod<'a> {
    /// The pod's UID, with dashes (as `metadata.uid` has it).
    pub pod_uid: String,
    /// The container's runtime ID, when the path goes down to a container.
    pub container_id: Option<&'a str>,
}

/// The runtimes' prefixes of a container's systemd scope (`<prefix>-<id>.scope`).
const SCOPE_PREFIXES: [&str; 4] = ["cri-containerd-", "crio-", "docker-", "containerd-"];

/// The pod and container of `path`, if it is a pod's cgroup.
pub fn pod_of_cgroup(path: &str) -> Option<CgroupPod<'_>> {
    let mut segments = path.split('/').filter(|s| !s.is_empty() && *s != "..");
    segments.find(|s| *s == "kubepods" || s.ends_with("kubepods.slice"))?;
    let mut segment = segments.next()?;
    if is_qos_level(segment) {
        segment = segments.next()?;
    }
    let pod_uid = pod_uid(segment)?;
    let container_id = segments.next().and_then(container_id);
    Some(CgroupPod {
        pod_uid,
        container_id,
    })
}

/// `burstable`, `besteffort`, or their systemd slices (`kubepods-burstable.slice`).
fn is_qos_level(segment: &str) -> bool {
    let level = segment
        .strip_suffix(".slice")
        .and_then(|s| s.rsplit('-').next())
        .unwrap_or(segment);
    !segment.contains("-pod") && matches!(level, "burstable" | "besteffort")
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_>.slice` (systemd).
fn pod_uid(segment: &str) -> Option<String> {
    let uid = match segment.strip_suffix(".slice") {
        Some(slice) => slice.rsplit_once("-pod")?.1.replace('_', "-"),
        None => segment.strip_prefix("pod")?.to_owned(),
    };
    // A UUID, or a static pod's hash: hex digits and dashes.
    let valid = !uid.is_empty()
        && uid.len() <= 64
        && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    valid.then_some(uid)
}

/// `<id>` (cgroupfs) or `<runtime>-<id>.scope` (systemd). CRI-O's `crio-conmon-<id>.scope` is
/// the container's monitor, not the container.
fn container_id(segment: &str) -> Option<&str> {
    let id = match segment.strip_suffix(".scope") {
        Some(scope) => SCOPE_PREFIXES
            .iter()
            .find_map(|prefix| scope.strip_prefix(prefix))?,
        None => segment,
    };
    let valid = (12..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then_some(id)
}

/// The cgroup to report for a task, from its `/proc/<pid>/cgroup`: the first line whose path is
/// a pod's, else the memory controller's (cgroup v1) or the unified one (v2), else none.
pub fn task_cgroup(proc_cgroup: &str) -> Option<&str> {
    let lines = || {
        proc_cgroup.lines().filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            Some((controllers, path))
        })
    };
    lines()
        .find(|(_, path)| pod_of_cgroup(path).is_some())
        .or_else(|| lines().find(|(c, _)| c.split(',').any(|c| c == "memory")))
        .or_else(|| lines().find(|(c, _)| c.is_empty()))
        .map(|(_, path)| path)
}

/// The victim's memory cgroup and pid from the kernel's line for every OOM kill:
/// `oom-kill:constraint=...,oom_memcg=<path>,task_memcg=<path>,task=<comm>,pid=<pid>,uid=<uid>`
/// (kernels since 4.19). Read from the right: a command name may contain commas.
pub fn oom_kill_line(message: &str) -> Option<(i32, &str)> {
    let rest = message.strip_prefix("oom-kill:")?;
    let (rest, _uid) = rest.rsplit_once(",uid=")?;
    let (rest, pid) = rest.rsplit_once(",pid=")?;
    let pid = pid.parse().ok()?;
    let start = rest.find("task_memcg=")? + "task_memcg=".len();
    let (memcg, _comm) = rest[start..].rsplit_once(",task=")?;
    Some((pid, memcg))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f6b4e1c-5d8a-4b7e-9c3f-2a1d6e8f7b90";
    const CID: &str = "5d3a1f9c8b7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c";

    /// A path and what it names: the pod's UID and the container's ID.
    type Case = (String, Option<(&'static str, Option<&'static str>)>);

    /// Real-world paths (from kubelet's own tests, containerd, CRI-O, kind and minikube
    /// nodes) and what they name.
    #[test]
    fn kubelet_layouts() {
        let u = UID.replace('-', "_");
        let table: Vec<Case> = vec![
            // cgroupfs driver, v1 and v2 alike, each QoS class.
            (
                format!("/kubepods/burstable/pod{UID}/{CID}"),
                Some((UID, Some(CID))),
            ),
            (
                format!("/kubepods/besteffort/pod{UID}/{CID}"),
                Some((UID, Some(CID))),
            ),
            (format!("/kubepods/pod{UID}/{CID}"), Some((UID, Some(CID)))),
            // The pod's own cgroup (a pod-level OOM), and the sandbox under it.
            (format!("/kubepods/burstable/pod{UID}"), Some((UID, None))),
            (format!("/kubepods/burstable/pod{UID}/"), Some((UID, None))),
            // systemd driver: containerd, CRI-O, Docker (cri-dockerd).
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
                Some((UID, Some(CID))),
            ),
            (
                format!(
                    "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u}.slice/crio-{CID}.scope"
                ),
                Some((UID, Some(CID))),
            ),
            (
                format!("/kubepods.slice/kubepods-pod{u}.slice/docker-{CID}.scope"),
                Some((UID, Some(CID))),
            ),
            // CRI-O's conmon is in the pod, not in a container.
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u}.slice/crio-conmon-{CID}.scope"
                ),
                Some((UID, None)),
            ),
            // A process nested below the container's cgroup is still the container's.
            (
                format!("/kubepods.slice/kubepods-pod{u}.slice/cri-containerd-{CID}.scope/init"),
                Some((UID, Some(CID))),
            ),
            // A kind node (the node is a container) and a cgroup namespace's view.
            (
                format!("/docker/{CID}/kubepods/besteffort/pod{UID}/{CID}"),
                Some((UID, Some(CID))),
            ),
            (
                format!(
                    "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{u}.slice/cri-containerd-{CID}.scope"
                ),
                Some((UID, Some(CID))),
            ),
            (
                format!("/../../kubepods/pod{UID}/{CID}"),
                Some((UID, Some(CID))),
            ),
            // A static pod's UID is its config's hash.
            (
                format!("/kubepods/burstable/pod6b5d8e3f1c2a4b7d9e0f1a2b3c4d5e6f/{CID}"),
                Some(("6b5d8e3f1c2a4b7d9e0f1a2b3c4d5e6f", Some(CID))),
            ),
            // Not a pod.
            ("/".into(), None),
            ("".into(), None),
            ("/system.slice/containerd.service".into(), None),
            ("/user.slice/user-1000.slice/session-3.scope".into(), None),
            ("/kubepods".into(), None),
            ("/kubepods/burstable".into(), None),
            ("/kubepods.slice/kubepods-burstable.slice".into(), None),
            ("/kubepods/burstable/not-a-pod/x".into(), None),
            (format!("/kubepods/burstable/pod{UID}zz/{CID}"), None),
            ("/npd-test-123/kubepods-ish".into(), None),
            // A container ID that is not one.
            (format!("/kubepods/pod{UID}/not-hex"), Some((UID, None))),
            (
                format!("/kubepods.slice/kubepods-pod{u}.slice/runc-{CID}.scope"),
                Some((UID, None)),
            ),
        ];
        for (path, want) in table {
            let got = pod_of_cgroup(&path).map(|p| (p.pod_uid, p.container_id));
            let want = want.map(|(u, c)| (u.to_owned(), c));
            assert_eq!(got, want, "{path}");
        }
    }

    #[test]
    fn the_task_cgroup_from_proc() {
        // cgroup v1: the memory controller's line names the pod.
        let v1 = format!(
            "12:pids:/kubepods/burstable/pod{UID}/{CID}\n\
             11:memory:/kubepods/burstable/pod{UID}/{CID}\n\
             1:name=systemd:/system.slice/x.service\n"
        );
        assert_eq!(
            task_cgroup(&v1),
            Some(format!("/kubepods/burstable/pod{UID}/{CID}").as_str())
        );
        // cgroup v2.
        let v2 = format!("0::/kubepods/pod{UID}/{CID}\n");
        assert_eq!(
            task_cgroup(&v2),
            Some(format!("/kubepods/pod{UID}/{CID}").as_str())
        );
        // No pod: the memory cgroup, else the unified one.
        assert_eq!(
            task_cgroup("4:cpu,cpuacct:/a\n3:memory:/npd-test\n0::/b\n"),
            Some("/npd-test")
        );
        assert_eq!(task_cgroup("0::/user.slice\n"), Some("/user.slice"));
        assert_eq!(task_cgroup(""), None);
        assert_eq!(task_cgroup("garbage"), None);
    }

    #[test]
    fn the_kernels_oom_kill_line() {
        let line = format!(
            "oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=/,mems_allowed=0,\
             oom_memcg=/kubepods/burstable/pod{UID},task_memcg=/kubepods/burstable/pod{UID}/{CID},\
             task=st,ress,pid=4242,uid=0"
        );
        assert_eq!(
            oom_kill_line(&line),
            Some((4242, format!("/kubepods/burstable/pod{UID}/{CID}").as_str()))
        );
        assert_eq!(oom_kill_line("oom-kill:constraint=CONSTRAINT_NONE"), None);
        assert_eq!(oom_kill_line("Killed process 1 (x)"), None);
        assert_eq!(
            oom_kill_line("oom-kill:task_memcg=/,task=x,pid=nope,uid=0"),
            None
        );
    }
}
