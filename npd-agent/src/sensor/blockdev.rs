//! Resolves block device numbers to kernel names through sysfs (`/sys/dev/block/MAJ:MIN` is a
//! link to the device's directory, named after it), and through `/proc/partitions` where sysfs
//! cannot say (not mounted, or a link that cannot be read). Nothing is cached: dynamic numbers
//! (NVMe `259:*`, device-mapper) are reused by other devices, and errors are rare, so each one
//! is resolved when it happens. This is blocking file-system I/O: it runs off the ring reader
//! (see [`crate::enrich`]).

use std::{
    io,
    path::{Path, PathBuf},
};

use crate::{
    event::DevNum,
    logging::{LOG_INTERVAL, LogLimiter},
};

/// Where the device links are.
pub const SYSFS_DEV_BLOCK: &str = "/sys/dev/block";

static UNRESOLVED: LogLimiter = LogLimiter::new(LOG_INTERVAL, 1);

/// The kernel name of `dev` (`loop0`): from its link under `root` (normally
/// [`SYSFS_DEV_BLOCK`]), else from the `partitions` file (`/proc/partitions`, which lists every
/// disk and partition that has a size), else `None`, logged (rate limited) with both reasons.
pub fn device_name(root: &Path, partitions: &Path, dev: DevNum) -> Option<String> {
    let sysfs = match sysfs_name(root, dev) {
        Ok(name) => return Some(name),
        Err(e) => e,
    };
    let listed = match std::fs::read_to_string(partitions) {
        Ok(text) => match partitions_name(&text, dev) {
            Some(name) => return Some(name.to_owned()),
            None => "not listed".to_owned(),
        },
        Err(e) => e.to_string(),
    };
    if let Some(held_back) = UNRESOLVED.allow() {
        tracing::warn!(
            held_back,
            "block device {dev} has no name: {}: {sysfs}; {}: {listed}",
            root.join(dev.to_string()).display(),
            partitions.display()
        );
    }
    None
}

fn sysfs_name(root: &Path, dev: DevNum) -> io::Result<String> {
    let target: PathBuf = std::fs::read_link(root.join(dev.to_string()))?;
    target
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .ok_or_else(|| io::Error::other(format!("link to {} names no device", target.display())))
}

/// The name `/proc/partitions` (`major minor #blocks name` after a header) gives `dev`.
fn partitions_name(text: &str, dev: DevNum) -> Option<&str> {
    text.lines().find_map(|line| {
        let mut f = line.split_ascii_whitespace();
        let (major, minor, _blocks, name) = (f.next()?, f.next()?, f.next()?, f.next()?);
        (major.parse() == Ok(dev.major) && minor.parse() == Ok(dev.minor)).then_some(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_through_links_every_time() {
        let dir = std::env::temp_dir().join(format!("npd-blockdev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("259:3");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("../../devices/pci0000:00/nvme/nvme0/nvme0n1", &link).unwrap();
        let dev = DevNum {
            major: 259,
            minor: 3,
        };
        let partitions = dir.join("partitions");
        assert_eq!(
            device_name(&dir, &partitions, dev).as_deref(),
            Some("nvme0n1")
        );
        // The number is reused by another device: the new name, not a remembered one.
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink("../../devices/virtual/block/dm-7", &link).unwrap();
        assert_eq!(device_name(&dir, &partitions, dev).as_deref(), Some("dm-7"));
        let loop4 = DevNum { major: 7, minor: 4 };
        assert_eq!(device_name(&dir, &partitions, loop4), None);
        // No link, but /proc/partitions lists it.
        std::fs::write(
            &partitions,
            "major minor  #blocks  name\n\n 254        0  268435456 vda\n   7        4      16384 loop4\n",
        )
        .unwrap();
        assert_eq!(
            device_name(&dir, &partitions, loop4).as_deref(),
            Some("loop4")
        );
        assert_eq!(
            device_name(
                &dir,
                &partitions,
                DevNum {
                    major: 7,
                    minor: 40
                }
            ),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
