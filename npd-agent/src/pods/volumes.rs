//! A block device to the pods whose volumes live on it, from the host's mount table. Pure
//! functions, no I/O: the caller reads `/proc/1/mountinfo` and resolves partitions.
//!
//! kubelet mounts a pod's volumes under `<root-dir>/pods/<uid>/volumes/<plugin>/<name>`
//! (`kubernetes.io~csi/pvc-.../mount` for CSI), and their sub-paths under
//! `<root-dir>/pods/<uid>/volume-subpaths/...`. A failed request has no pod, but a volume does:
//! every pod with such a mount on the failed device is named.

use crate::event::DevNum;

/// At most this many pods are named for one device (a device shared by more is named by
/// these).
pub const MAX_PODS: usize = 16;

/// One line of `/proc/<pid>/mountinfo`: the mounted device and where it is mounted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The device (`major:minor`, field 3).
    pub dev: DevNum,
    /// The mount point (field 5), with the kernel's octal escapes (`\040`) undone.
    pub point: String,
}

/// Parses one `mountinfo` line; `None` for a line that is not one.
pub fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let mut fields = line.split(' ');
    let (_id, _parent, dev, _root, point) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let (major, minor) = dev.split_once(':')?;
    Some(Mount {
        dev: DevNum {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        },
        point: unescape(point),
    })
}

/// Undoes the kernel's escapes of space, tab, newline and backslash (`\040`, `\011`, `\012`,
/// `\134`).
fn unescape(s: &str) -> String {
    if !s.contains('\\') {
        return s.to_owned();
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let value = d.iter().fold(0u32, |v, b| v * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The pod UID whose volume `point` is, under kubelet's `pods_dir` (`<root-dir>/pods`).
pub fn volume_pod<'a>(pods_dir: &str, point: &'a str) -> Option<&'a str> {
    let rest = point
        .strip_prefix(pods_dir.trim_end_matches('/'))?
        .strip_prefix('/')?;
    let (uid, rest) = rest.split_once('/')?;
    let volume = rest.starts_with("volumes/") || rest.starts_with("volume-subpaths/");
    let uid_like = !uid.is_empty() && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    (volume && uid_like).then_some(uid)
}

/// The UIDs of the pods with a volume on a device, from `mountinfo`: mounts under `pods_dir`
/// whose device `on_device` accepts (the device itself, or one of its partitions). Sorted,
/// each once, at most [`MAX_PODS`].
pub fn pods_on_device(
    mountinfo: &str,
    pods_dir: &str,
    mut on_device: impl FnMut(DevNum) -> bool,
) -> Vec<String> {
    let mut uids: Vec<String> = Vec::new();
    for mount in mountinfo.lines().filter_map(parse_mountinfo_line) {
        let Some(uid) = volume_pod(pods_dir, &mount.point) else {
            continue;
        };
        if !uids.iter().any(|u| u == uid) && on_device(mount.dev) {
            uids.push(uid.to_owned());
        }
    }
    uids.sort();
    uids.truncate(MAX_PODS);
    uids
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
30 22 0:25 / /sys rw,nosuid shared:7 - sysfs sysfs rw
301 22 259:3 / /var/lib/kubelet/pods/0f6b4e1c-5d8a-4b7e-9c3f-2a1d6e8f7b90/volumes/kubernetes.io~csi/pvc-1/mount rw shared:150 - ext4 /dev/nvme1n1 rw
302 22 259:3 / /var/lib/kubelet/pods/0f6b4e1c-5d8a-4b7e-9c3f-2a1d6e8f7b90/volume-subpaths/data/app/0 rw shared:150 - ext4 /dev/nvme1n1 rw
303 22 7:4 / /var/lib/kubelet/pods/11111111-2222-3333-4444-555555555555/volumes/kubernetes.io~local-volume/my\\040disk rw - ext4 /dev/loop4 rw
304 22 7:4 / /var/lib/kubelet/plugins/kubernetes.io/csi/pv/pvc-2/globalmount rw - ext4 /dev/loop4 rw
305 22 0:60 / /var/lib/kubelet/pods/22222222-2222-3333-4444-555555555555/volumes/kubernetes.io~projected/kube-api-access rw - tmpfs tmpfs rw
306 22 7:4 / /var/lib/kubelet/pods/aaaaaaaa-2222-3333-4444-555555555555/volumes/kubernetes.io~csi/pvc-2/mount rw - ext4 /dev/loop4 rw
not a mountinfo line
";

    #[test]
    fn mountinfo_lines() {
        assert_eq!(
            parse_mountinfo_line(
                "303 22 7:4 / /var/lib/kubelet/pods/x/volumes/a\\040b\\134c rw - ext4 /dev/loop4 rw"
            ),
            Some(Mount {
                dev: DevNum { major: 7, minor: 4 },
                point: "/var/lib/kubelet/pods/x/volumes/a b\\c".into(),
            })
        );
        assert_eq!(parse_mountinfo_line(""), None);
        assert_eq!(parse_mountinfo_line("1 2 x:y / /"), None);
        assert_eq!(unescape("\\04"), "\\04");
    }

    #[test]
    fn pods_with_a_volume_on_the_device() {
        let dir = "/var/lib/kubelet/pods";
        let on = |dev: DevNum| move |d: DevNum| d == dev;
        // A CSI volume and its sub-path: one pod, once.
        assert_eq!(
            pods_on_device(
                MOUNTINFO,
                dir,
                on(DevNum {
                    major: 259,
                    minor: 3
                })
            ),
            ["0f6b4e1c-5d8a-4b7e-9c3f-2a1d6e8f7b90"]
        );
        // Two pods share the device; the plugin's global mount is no pod's.
        assert_eq!(
            pods_on_device(MOUNTINFO, dir, on(DevNum { major: 7, minor: 4 })),
            [
                "11111111-2222-3333-4444-555555555555",
                "aaaaaaaa-2222-3333-4444-555555555555"
            ]
        );
        // The root disk holds no pod volume (emptyDir is a directory, not a mount).
        assert!(pods_on_device(MOUNTINFO, dir, on(DevNum { major: 8, minor: 1 })).is_empty());
        // Another kubelet root directory.
        assert!(pods_on_device(MOUNTINFO, "/data/kubelet/pods", |_| true).is_empty());
        assert_eq!(
            pods_on_device(MOUNTINFO, "/var/lib/kubelet/pods/", |_| true).len(),
            4
        );
    }

    #[test]
    fn volume_paths() {
        let dir = "/k/pods";
        assert_eq!(volume_pod(dir, "/k/pods/abc-1/volumes/x/y"), Some("abc-1"));
        assert_eq!(
            volume_pod(dir, "/k/pods/abc-1/volume-subpaths/x"),
            Some("abc-1")
        );
        assert_eq!(volume_pod(dir, "/k/pods/abc-1/etc-hosts"), None);
        assert_eq!(volume_pod(dir, "/k/podsx/abc/volumes/x"), None);
        assert_eq!(volume_pod(dir, "/k/pods/../volumes/x"), None);
        assert_eq!(volume_pod(dir, "/k/pods"), None);
    }
}
