//! Resolves block device numbers to kernel names through sysfs (`/sys/dev/block/MAJ:MIN` is a
//! link to the device's directory, named after it). Nothing is cached: dynamic numbers (NVMe
//! `259:*`, device-mapper) are reused by other devices, and errors are rare, so each one is
//! resolved when it happens. This is blocking file-system I/O: it runs off the ring reader
//! (see [`crate::enrich`]).

use std::path::{Path, PathBuf};

use crate::event::DevNum;

/// Where the device links are.
pub const SYSFS_DEV_BLOCK: &str = "/sys/dev/block";

/// The kernel name of `dev` (`loop0`) under `root` (normally [`SYSFS_DEV_BLOCK`]), or `None`
/// when it cannot be resolved (the device is gone, or sysfs is not mounted).
pub fn device_name(root: &Path, dev: DevNum) -> Option<String> {
    let target: PathBuf = std::fs::read_link(root.join(dev.to_string())).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
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
        assert_eq!(device_name(&dir, dev).as_deref(), Some("nvme0n1"));
        // The number is reused by another device: the new name, not a remembered one.
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink("../../devices/virtual/block/dm-7", &link).unwrap();
        assert_eq!(device_name(&dir, dev).as_deref(), Some("dm-7"));
        assert_eq!(device_name(&dir, DevNum { major: 7, minor: 4 }), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
