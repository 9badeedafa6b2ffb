//! Resolves block device numbers to kernel names through sysfs (`/sys/dev/block/MAJ:MIN` is a
//! link to the device's directory, named after it).

use std::{collections::HashMap, path::PathBuf};

use super::decode::DeviceNames;
use crate::event::DevNum;

/// Looks names up in `/sys/dev/block`, remembering what it found.
#[derive(Debug)]
pub struct SysfsDeviceNames {
    root: PathBuf,
    known: HashMap<DevNum, String>,
}

impl Default for SysfsDeviceNames {
    fn default() -> Self {
        Self::new("/sys/dev/block")
    }
}

impl SysfsDeviceNames {
    /// Resolves under `root` instead of `/sys/dev/block`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            known: HashMap::new(),
        }
    }
}

impl DeviceNames for SysfsDeviceNames {
    fn name(&mut self, dev: DevNum) -> Option<String> {
        if let Some(name) = self.known.get(&dev) {
            return Some(name.clone());
        }
        // A device number keeps its name while it exists (loop0 is always 7:0); failures are not
        // remembered, so a device that appears later still resolves.
        let target = std::fs::read_link(self.root.join(dev.to_string())).ok()?;
        let name = target.file_name()?.to_string_lossy().into_owned();
        self.known.insert(dev, name.clone());
        Some(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_through_links() {
        let dir = std::env::temp_dir().join(format!("npd-blockdev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let link = dir.join("7:3");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("../../devices/virtual/block/loop3", &link).unwrap();
        let mut names = SysfsDeviceNames::new(&dir);
        assert_eq!(
            names.name(DevNum { major: 7, minor: 3 }).as_deref(),
            Some("loop3")
        );
        assert_eq!(names.name(DevNum { major: 7, minor: 4 }), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
