//! `/dev/kmsg`: the record format (pure parsing, also used by `replay`) and the fallback reader
//! used when eBPF cannot be.
//!
//! The reader never stops and never silently reopens. When the kernel's log buffer wraps
//! before we read, `read` fails with EPIPE and the next read returns the oldest record still
//! there; the gap in sequence numbers is exactly how many records we lost, and is counted.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{Arc, atomic::Ordering},
};

use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::SensorStats;
use crate::event::{KernelEvent, LogMessage};

/// One `/dev/kmsg` record: `PRI,SEQ,USEC,FLAGS[,...];TEXT` plus optional ` KEY=VALUE` lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsgRecord {
    /// Syslog priority: facility << 3 | level.
    pub priority: u32,
    /// The kernel's sequence number.
    pub seq: u64,
    /// Microseconds since boot.
    pub usec: u64,
    /// The message text, `\xNN` escapes decoded, without the trailing newline.
    pub text: String,
}

/// Parses one record as read from `/dev/kmsg` (or one such line from a file). `None` when it
/// does not have the record shape.
pub fn parse_record(raw: &[u8]) -> Option<KmsgRecord> {
    let semi = raw.iter().position(|&b| b == b';')?;
    let prefix = std::str::from_utf8(&raw[..semi]).ok()?;
    let mut parts = prefix.split(',');
    let priority = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let usec = parts.next()?.parse().ok()?;
    // The text ends at the first newline; dictionary lines (" KEY=VALUE") follow it.
    let rest = &raw[semi + 1..];
    let text = rest.split(|&b| b == b'\n').next().unwrap_or_default();
    Some(KmsgRecord {
        priority,
        seq,
        usec,
        text: String::from_utf8_lossy(&unescape(text)).into_owned(),
    })
}

/// Decodes the `\xNN` escapes `/dev/kmsg` uses for unprintable bytes (and for `\` itself).
pub fn unescape(text: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] == b'\\'
            && text.get(i + 1) == Some(&b'x')
            && let (Some(h), Some(l)) = (
                text.get(i + 2).copied().and_then(hex),
                text.get(i + 3).copied().and_then(hex),
            )
        {
            out.push(h << 4 | l);
            i += 4;
            continue;
        }
        out.push(text[i]);
        i += 1;
    }
    out
}

/// Counts records lost between consecutive sequence numbers.
#[derive(Debug, Default)]
pub struct SequenceTracker {
    last: Option<u64>,
}

impl SequenceTracker {
    /// Notes a record's sequence number; returns how many records were skipped before it.
    pub fn observe(&mut self, seq: u64) -> u64 {
        let lost = match self.last {
            Some(last) if seq > last + 1 => seq - last - 1,
            _ => 0,
        };
        if self.last.is_none_or(|last| seq > last) {
            self.last = Some(seq);
        }
        lost
    }
}

/// Reads `/dev/kmsg` and sends each new record as a [`KernelEvent::Log`].
pub struct KmsgReader {
    fd: AsyncFd<OwnedFd>,
    seq: SequenceTracker,
    buf: Vec<u8>,
}

/// Room for the largest record (the kernel's limit is about 8 KiB with dictionary).
const READ_BUF: usize = 16 * 1024;

impl KmsgReader {
    /// Opens the device and skips the backlog already in the kernel's buffer (reading it only
    /// to learn the current sequence number, so that a loss right at start is counted too).
    pub fn open(path: &Path) -> io::Result<Self> {
        let cpath = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
        // SAFETY: a valid C string; the returned fd is owned below.
        let raw = unsafe {
            libc::open(
                cpath.as_ptr(),
                libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut reader = Self {
            fd: super::register_readable(fd)?,
            seq: SequenceTracker::default(),
            buf: vec![0; READ_BUF],
        };
        loop {
            match reader.read_one() {
                Ok(Some(n)) => {
                    if let Some(rec) = parse_record(&reader.buf[..n]) {
                        reader.seq.observe(rec.seq);
                    }
                }
                Ok(None) => break,
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(reader)
    }

    /// One non-blocking read: `Ok(Some(len))`, `Ok(None)` when nothing is pending.
    fn read_one(&mut self) -> io::Result<Option<usize>> {
        read_record(self.fd.as_raw_fd(), &mut self.buf)
    }

    /// Reads until the receiver goes away. Returns an error only when the device itself fails;
    /// the reader can then be run again.
    pub async fn run(
        &mut self,
        tx: &mpsc::Sender<KernelEvent>,
        stats: &SensorStats,
    ) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            loop {
                match read_record(guard.get_inner().as_raw_fd(), &mut self.buf) {
                    Ok(Some(n)) => {
                        let Some(rec) = parse_record(&self.buf[..n]) else {
                            stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        let lost = self.seq.observe(rec.seq);
                        if lost > 0 {
                            stats.kmsg_lost.fetch_add(lost, Ordering::Relaxed);
                        }
                        stats.received[0].fetch_add(1, Ordering::Relaxed);
                        let event = KernelEvent::Log(LogMessage {
                            message: rec.text,
                            truncated_from: None,
                            seq: Some(rec.seq),
                        });
                        if tx.send(event).await.is_err() {
                            return Ok(());
                        }
                    }
                    Ok(None) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                        // The buffer wrapped under us; the sequence gap counts what was lost.
                        stats.kmsg_overruns.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

/// A [`KmsgReader`] with its consumer, as the supervisor restarts it.
pub(crate) struct KmsgTask {
    pub(crate) reader: KmsgReader,
    pub(crate) tx: mpsc::Sender<KernelEvent>,
    pub(crate) stats: Arc<SensorStats>,
}

impl super::supervise::Reader for KmsgTask {
    fn run(&mut self) -> impl std::future::Future<Output = io::Result<()>> + Send + '_ {
        self.reader.run(&self.tx, &self.stats)
    }
}

/// One non-blocking read of a record into `buf`: `Ok(Some(len))`, `Ok(None)` when nothing is
/// pending.
fn read_record(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: reading into a buffer we own, of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            _ => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_records() {
        let rec = parse_record(b"6,1234,5678901,-;hello world\n").unwrap();
        assert_eq!(
            rec,
            KmsgRecord {
                priority: 6,
                seq: 1234,
                usec: 5678901,
                text: "hello world".into()
            }
        );
        let rec = parse_record(
            b"3,7,100,-,caller=T42;sd 0:0:0:0: oops\n SUBSYSTEM=scsi\n DEVICE=+scsi:0:0:0:0\n",
        )
        .unwrap();
        assert_eq!(rec.text, "sd 0:0:0:0: oops");
        assert_eq!(rec.seq, 7);
        let rec = parse_record(b"4,8,1,c;a\\x5cb\\x0ac\\xffd\\xZZ").unwrap();
        assert_eq!(rec.text, "a\\b\nc\u{fffd}d\\xZZ");
        assert_eq!(parse_record(b"no record here"), None);
        assert_eq!(parse_record(b"x,1,2,-;text"), None);
    }

    #[test]
    fn sequence_gaps_are_counted() {
        let mut t = SequenceTracker::default();
        assert_eq!(t.observe(10), 0);
        assert_eq!(t.observe(11), 0);
        assert_eq!(t.observe(15), 3);
        assert_eq!(t.observe(14), 0);
        assert_eq!(t.observe(16), 0);
    }
}
