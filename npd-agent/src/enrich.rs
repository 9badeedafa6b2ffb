//! Enrichment: what the kernel's record does not carry and a lookup on the host adds, done
//! between the sensor and the rules, never on the ring reader (which only reads and decodes,
//! so that a slow lookup never makes the kernel drop records). Lookups are blocking file-system
//! reads and run on tokio's blocking pool.
//!
//! Today: the name of a failed block request's device (`/sys/dev/block`).

use std::path::PathBuf;

use crate::{
    event::{Detail, KernelEvent},
    sensor::blockdev,
};

/// Adds host facts to kernel events.
#[derive(Clone, Debug)]
pub struct Enricher {
    /// Where block device numbers resolve to names (normally `/sys/dev/block`).
    pub dev_block: PathBuf,
}

impl Default for Enricher {
    fn default() -> Self {
        Enricher {
            dev_block: PathBuf::from(blockdev::SYSFS_DEV_BLOCK),
        }
    }
}

impl Enricher {
    /// Fills in what `event` lacks. Most events need nothing and cost nothing.
    pub async fn enrich(&self, event: &mut KernelEvent) {
        if let Detail::BlockError(b) = &mut event.detail
            && b.device.is_none()
        {
            let (root, dev) = (self.dev_block.clone(), b.dev);
            b.device = tokio::task::spawn_blocking(move || blockdev::device_name(&root, dev))
                .await
                .ok()
                .flatten();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        event::{LogMessage, fixtures},
        time::Mono,
    };

    #[tokio::test]
    async fn block_errors_get_their_device_name() {
        let dir = std::env::temp_dir().join(format!("npd-enrich-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("7:0"));
        std::os::unix::fs::symlink("../../devices/virtual/block/loop0", dir.join("7:0")).unwrap();
        let enricher = Enricher {
            dev_block: dir.clone(),
        };
        let mut event = KernelEvent::new(Mono::ZERO, fixtures::block_error(None));
        enricher.enrich(&mut event).await;
        let Detail::BlockError(b) = &event.detail else {
            unreachable!()
        };
        assert_eq!(b.device.as_deref(), Some("loop0"));
        let mut log = KernelEvent::new(Mono::ZERO, LogMessage::new("x"));
        let before = log.clone();
        enricher.enrich(&mut log).await;
        assert_eq!(log, before);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
