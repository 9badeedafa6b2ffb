//! `/dev/kmsg`: the record format (pure parsing, also used by `replay`) and the fallback reader
//! used when eBPF cannot be.
//!
//! The reader never stops and never silently reopens. When the kernel's log buffer wraps
//! before we read, `read` fails with EPIPE and the next read returns the oldest record still
//! there; the gap in sequence numbers is exactly how many records we lost, and is counted.
//!
//! `--kmsg-path` may also name a file or a pipe holding records, one per line (what
//! `cat /dev/kmsg` writes): they are read from the start, and the end of the input ends the
//! reader, which says so. A `read` of 0 bytes from the device is the end of input too, never a
//! record.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::Arc,
    time::Duration,
};

use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{Batch, SensorStats, supervise::Finished};
use crate::{
    event::{EventKind, KernelEvent, LogMessage},
    time::Mono,
};

/// The most records handed over in one burst.
const MAX_BATCH: usize = 1024;

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
        text: super::kernel_string(unescape(text)),
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
        // Records from a file may carry any number, up to u64::MAX: no sum may overflow.
        let lost = match self.last {
            Some(last) if seq > last => seq - last - 1,
            _ => 0,
        };
        if self.last.is_none_or(|last| seq > last) {
            self.last = Some(seq);
        }
        lost
    }
}

/// Reads `/dev/kmsg` (or records from a file or pipe) and sends each new record as a
/// kernel log message ([`crate::event::Detail::Log`]).
pub struct KmsgReader {
    input: Input,
    seq: SequenceTracker,
    buf: Vec<u8>,
}

/// Where records come from.
enum Input {
    /// The kernel's log device: one record per `read`.
    Device(AsyncFd<OwnedFd>),
    /// A file or a pipe: one record per line, `/dev/kmsg` dictionary lines (` KEY=VALUE`)
    /// skipped. `None` once its end was reached.
    Lines(Option<tokio::io::BufReader<tokio::fs::File>>),
}

/// Room for the largest record (the kernel's limit is about 8 KiB with dictionary).
const READ_BUF: usize = 16 * 1024;

impl KmsgReader {
    /// Opens the input. The kernel's device: skips the backlog already in the kernel's buffer
    /// (reading it only to learn the current sequence number, so that a loss right at start is
    /// counted too). A file or a pipe: read from its start.
    pub fn open(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt as _;
        let device = std::fs::metadata(path)?.file_type().is_char_device();
        if !device {
            let file = std::fs::File::open(path)?;
            return Ok(Self {
                input: Input::Lines(Some(tokio::io::BufReader::with_capacity(
                    READ_BUF,
                    tokio::fs::File::from_std(file),
                ))),
                seq: SequenceTracker::default(),
                buf: Vec::with_capacity(READ_BUF),
            });
        }
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
        let fd = super::register_readable(fd)?;
        let mut seq = SequenceTracker::default();
        let mut buf = vec![0; READ_BUF];
        loop {
            match read_record(fd.as_raw_fd(), &mut buf) {
                Ok(Read::Record(n)) => {
                    if let Some(rec) = parse_record(&buf[..n]) {
                        seq.observe(rec.seq);
                    }
                }
                Ok(Read::Nothing | Read::End) => break,
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Self {
            input: Input::Device(fd),
            seq,
            buf,
        })
    }

    /// Reads until the receiver goes away or the input ends. Returns an error only when the
    /// input itself fails; the reader can then be run again.
    pub(crate) async fn run(
        &mut self,
        tx: &mpsc::Sender<Batch>,
        stats: &SensorStats,
    ) -> io::Result<Finished> {
        match &mut self.input {
            Input::Device(fd) => read_device(fd, &mut self.buf, &mut self.seq, tx, stats).await,
            Input::Lines(lines) => read_lines(lines, &mut self.buf, &mut self.seq, tx, stats).await,
        }
    }
}

/// Counts a record (and the records lost before it) and adds it to the burst. Its time is the
/// kernel's: microseconds since boot.
fn take(rec: KmsgRecord, seq: &mut SequenceTracker, batch: &mut Batch, stats: &SensorStats) {
    let lost = seq.observe(rec.seq);
    if lost > 0 {
        stats.kmsg_lost(lost);
    }
    stats.received(EventKind::Log);
    batch.push(KernelEvent::new(
        Mono::since_boot(Duration::from_micros(rec.usec)),
        LogMessage {
            message: rec.text,
            truncated_from: None,
            seq: Some(rec.seq),
        },
    ));
}

/// Hands a burst over (nothing when it is empty); false when the consumer is gone.
async fn hand_over(batch: &mut Batch, tx: &mpsc::Sender<Batch>) -> bool {
    if batch.is_empty() {
        return true;
    }
    tx.send(std::mem::take(batch)).await.is_ok()
}

async fn read_device(
    fd: &mut AsyncFd<OwnedFd>,
    buf: &mut [u8],
    seq: &mut SequenceTracker,
    tx: &mpsc::Sender<Batch>,
    stats: &SensorStats,
) -> io::Result<Finished> {
    let mut batch = Batch::new();
    loop {
        let mut guard = fd.readable().await?;
        loop {
            if batch.len() >= MAX_BATCH && !hand_over(&mut batch, tx).await {
                return Ok(Finished::ConsumerGone);
            }
            match read_record(guard.get_inner().as_raw_fd(), buf) {
                Ok(Read::Record(n)) => match parse_record(&buf[..n]) {
                    Some(rec) => take(rec, seq, &mut batch, stats),
                    None => stats.decode_error("/dev/kmsg record", &"not PRI,SEQ,USEC,FLAGS;TEXT"),
                },
                Ok(Read::Nothing) => {
                    guard.clear_ready();
                    break;
                }
                Ok(Read::End) => {
                    hand_over(&mut batch, tx).await;
                    return Ok(Finished::EndOfInput);
                }
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {
                    // The buffer wrapped under us; the sequence gap counts what was lost.
                    stats.kmsg_overrun();
                }
                Err(e) => {
                    hand_over(&mut batch, tx).await;
                    return Err(e);
                }
            }
        }
        if !hand_over(&mut batch, tx).await {
            return Ok(Finished::ConsumerGone);
        }
    }
}

async fn read_lines(
    lines: &mut Option<tokio::io::BufReader<tokio::fs::File>>,
    buf: &mut Vec<u8>,
    seq: &mut SequenceTracker,
    tx: &mpsc::Sender<Batch>,
    stats: &SensorStats,
) -> io::Result<Finished> {
    use tokio::io::AsyncBufReadExt as _;
    let Some(input) = lines else {
        return Ok(Finished::EndOfInput);
    };
    let mut batch = Batch::new();
    loop {
        // What is already buffered goes in one burst.
        if (batch.len() >= MAX_BATCH || input.buffer().is_empty())
            && !hand_over(&mut batch, tx).await
        {
            return Ok(Finished::ConsumerGone);
        }
        buf.clear();
        if input.read_until(b'\n', buf).await? == 0 {
            *lines = None;
            hand_over(&mut batch, tx).await;
            return Ok(Finished::EndOfInput);
        }
        if buf.first() == Some(&b' ') || buf.iter().all(u8::is_ascii_whitespace) {
            continue; // a dictionary line of the record before, or an empty line
        }
        match parse_record(buf) {
            Some(rec) => take(rec, seq, &mut batch, stats),
            None => stats.decode_error("/dev/kmsg record", &"not PRI,SEQ,USEC,FLAGS;TEXT"),
        }
    }
}

/// A [`KmsgReader`] with its consumer, as the supervisor restarts it.
pub(crate) struct KmsgTask {
    pub(crate) reader: KmsgReader,
    pub(crate) tx: mpsc::Sender<Batch>,
    pub(crate) stats: Arc<SensorStats>,
}

impl super::supervise::Reader for KmsgTask {
    fn run(&mut self) -> impl std::future::Future<Output = io::Result<Finished>> + Send + '_ {
        self.reader.run(&self.tx, &self.stats)
    }
}

/// What one read of the device gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Read {
    /// A record of this many bytes.
    Record(usize),
    /// Nothing pending now.
    Nothing,
    /// End of input (`read` returned 0): no record will ever come.
    End,
}

/// One non-blocking read of a record into `buf`.
fn read_record(fd: std::os::fd::RawFd, buf: &mut [u8]) -> io::Result<Read> {
    loop {
        // SAFETY: reading into a buffer we own, of the given length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            return Ok(Read::Record(n as usize));
        }
        if n == 0 {
            return Ok(Read::End);
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(Read::Nothing),
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

    /// A file of records is read from its start, to its end, which ends the reader (it never
    /// spins on a `read` of 0 bytes). Dictionary lines and a line that is no record are
    /// skipped, the latter counted.
    #[tokio::test]
    async fn records_from_a_file_end_with_the_file() {
        let path = std::env::temp_dir().join(format!("npd-kmsg-{}", std::process::id()));
        std::fs::write(
            &path,
            "6,10,1,-;first\n SUBSYSTEM=block\n\nnot a record\n6,13,2,-;second",
        )
        .unwrap();
        let mut reader = KmsgReader::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let (tx, mut rx) = mpsc::channel(8);
        let stats = SensorStats::default();
        assert_eq!(reader.run(&tx, &stats).await.unwrap(), Finished::EndOfInput);
        // Run again (as the supervisor would): still the end.
        assert_eq!(reader.run(&tx, &stats).await.unwrap(), Finished::EndOfInput);
        let mut texts = Vec::new();
        while let Ok(batch) = rx.try_recv() {
            for event in batch {
                let crate::event::Detail::Log(m) = event.detail else {
                    panic!("{event:?}")
                };
                // Its time is the record's, in microseconds since boot.
                assert_eq!(
                    event.at,
                    Mono::since_boot(Duration::from_micros(texts.len() as u64 + 1))
                );
                texts.push(m.message);
            }
        }
        assert_eq!(texts, ["first", "second"]);
        assert_eq!(stats.metrics.decode_errors.get(), 1);
        assert_eq!(stats.metrics.kmsg_lost.get(), 2);
    }

    #[test]
    fn zero_bytes_read_is_the_end() {
        let (r, w) = {
            let mut fds = [0; 2];
            // SAFETY: a plain syscall filling two descriptors we then own.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            // SAFETY: fresh descriptors nobody else owns.
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
        };
        drop(w);
        let mut buf = [0u8; 16];
        assert_eq!(read_record(r.as_raw_fd(), &mut buf).unwrap(), Read::End);
    }

    #[test]
    fn sequence_gaps_are_counted() {
        let mut t = SequenceTracker::default();
        assert_eq!(t.observe(10), 0);
        assert_eq!(t.observe(11), 0);
        assert_eq!(t.observe(15), 3);
        assert_eq!(t.observe(14), 0);
        assert_eq!(t.observe(16), 0);
        // Found by the kmsg_record fuzz target: a record file may hold any number.
        assert_eq!(t.observe(u64::MAX), u64::MAX - 17);
        assert_eq!(t.observe(5), 0);
        assert_eq!(t.observe(u64::MAX), 0);
    }
}
