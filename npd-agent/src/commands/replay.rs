//! `npd-agent replay --config FILE... [LOGFILE|-]`: feeds recorded kernel messages through the
//! same rules and condition logic as the daemon and prints what would be reported, one JSON
//! line each (the schema in `docs/design.md`).
//!
//! Input: one message per line, as plain text, `/dev/kmsg` records (`PRI,SEQ,USEC,FLAGS;text`,
//! `\xNN` escapes decoded, dictionary lines skipped) or `dmesg` lines (`[  12.345678] text`,
//! with or without a caller id such as `[ T8305]`; `dmesg -T` times are skipped). Any bytes are
//! accepted: invalid UTF-8 is replaced, lines longer than [`MAX_LINE`] are cut.
//!
//! Time: the replay clock starts at the Unix epoch and follows the recorded times since boot
//! (kmsg and dmesg lines), so recovery and rate windows behave as they did on the node; a
//! condition's `transition_time` then reads as time since boot.

use std::{
    io::{self, BufRead, Write},
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;

use crate::{
    cli::ReplayArgs,
    engine::Engine,
    event::{KernelEvent, LogMessage},
    rules::RuleSet,
    sensor::kmsg::parse_record,
    time::Mono,
};

/// The longest line read; the rest of a longer line is dropped (the kernel's own records are
/// at most about 8 KiB).
pub const MAX_LINE: usize = 1024 * 1024;

/// Replays recorded kernel messages through the rules.
pub fn main(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let rules = match RuleSet::load_or_defaults(&args.config) {
        Ok(rules) => rules,
        Err(e) => {
            eprintln!("npd-agent: invalid rules:\n{e}");
            return Ok(ExitCode::from(2));
        }
    };
    let stdout = io::stdout();
    let mut out = io::BufWriter::with_capacity(64 * 1024, stdout.lock());
    let result = match args.log.as_deref() {
        None => replay(rules, io::stdin().lock(), &mut out),
        Some(p) if p.as_os_str() == "-" => replay(rules, io::stdin().lock(), &mut out),
        Some(p) => {
            let file =
                std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
            replay(
                rules,
                io::BufReader::with_capacity(256 * 1024, file),
                &mut out,
            )
        }
    };
    result.context("replaying")?;
    out.flush().context("writing to stdout")?;
    Ok(ExitCode::SUCCESS)
}

/// Runs every line of `input` through a fresh engine and writes each report as a JSON line.
pub fn replay(rules: RuleSet, input: impl BufRead, out: &mut impl Write) -> io::Result<()> {
    replay_with(Engine::new(rules), input, out)
}

/// [`replay`] through a given engine, in its state (a clone of a fresh one costs no pattern
/// compilation).
pub fn replay_with(
    mut engine: Engine,
    mut input: impl BufRead,
    out: &mut impl Write,
) -> io::Result<()> {
    // Boot was at the Unix epoch; lines without a time happen when the line before did.
    let mut clock = Mono::ZERO;
    engine.initial_conditions(SystemTime::UNIX_EPOCH);
    let mut buf = Vec::with_capacity(4096);
    let mut after_record = false;
    while read_line_capped(&mut input, &mut buf, MAX_LINE)? {
        // `/dev/kmsg` dictionary lines (" SUBSYSTEM=...") belong to the record before them.
        if after_record && is_dictionary_line(&buf) {
            continue;
        }
        let line = parse_line(&buf);
        after_record = line.from_kmsg;
        if let Some(t) = line.since_boot {
            // Any time a line claims: the clock saturates, never overflows.
            clock = clock.max(Mono::since_boot(t));
        }
        let event = KernelEvent::new(clock, LogMessage::new(line.text));
        for report in engine.handle(&event) {
            serde_json::to_writer(&mut *out, &report)?;
            out.write_all(b"\n")?;
        }
    }
    Ok(())
}

/// Reads one line (without its `\n` or `\r\n`) into `buf`, keeping at most `cap` bytes of it.
/// Returns false at the end of the input.
fn read_line_capped(input: &mut impl BufRead, buf: &mut Vec<u8>, cap: usize) -> io::Result<bool> {
    buf.clear();
    let mut any = false;
    loop {
        let chunk = match input.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            break;
        }
        any = true;
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (chunk.len(), false),
        };
        let room = cap.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        input.consume(if done { take + 1 } else { take });
        if done {
            break;
        }
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(any)
}

fn is_dictionary_line(line: &[u8]) -> bool {
    let Some(rest) = line.strip_prefix(b" ") else {
        return false;
    };
    let key_len = rest
        .iter()
        .take_while(|b| b.is_ascii_uppercase() || **b == b'_')
        .count();
    key_len > 0 && rest.get(key_len) == Some(&b'=')
}

/// One recorded message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayLine {
    /// The message text.
    pub text: String,
    /// When it was logged, since boot, when the line says.
    pub since_boot: Option<Duration>,
    /// Whether the line was a `/dev/kmsg` record.
    pub from_kmsg: bool,
}

/// Recognises a `/dev/kmsg` record, a `dmesg` line or plain text.
pub fn parse_line(raw: &[u8]) -> ReplayLine {
    if raw.first().is_some_and(u8::is_ascii_digit)
        && let Some(rec) = parse_record(raw)
    {
        return ReplayLine {
            text: rec.text,
            since_boot: Some(Duration::from_micros(rec.usec)),
            from_kmsg: true,
        };
    }
    let text = String::from_utf8_lossy(raw);
    let mut since_boot = None;
    let mut rest: &str = &text;
    if let Some(inner) = rest.strip_prefix('[')
        && let Some(end) = inner.find(']')
    {
        let stamp = inner[..end].trim();
        if let Some(t) = parse_seconds(stamp) {
            since_boot = Some(t);
            rest = &inner[end + 1..];
        } else if looks_like_date(stamp) {
            rest = &inner[end + 1..];
        }
        if rest.len() != text.len() {
            rest = rest.strip_prefix(' ').unwrap_or(rest);
            // CONFIG_PRINTK_CALLER: `[ T8305]` or `[   C1]`.
            if let Some(inner) = rest.strip_prefix('[')
                && let Some(end) = inner.find(']')
            {
                let id = inner[..end].trim();
                if id.len() > 1
                    && (id.starts_with('T') || id.starts_with('C'))
                    && id[1..].bytes().all(|b| b.is_ascii_digit())
                {
                    rest = inner[end + 1..]
                        .strip_prefix(' ')
                        .unwrap_or(&inner[end + 1..]);
                }
            }
        }
    }
    ReplayLine {
        text: rest.to_owned(),
        since_boot,
        from_kmsg: false,
    }
}

/// `12.345678` seconds.
fn parse_seconds(s: &str) -> Option<Duration> {
    let (secs, frac) = s.split_once('.')?;
    if secs.is_empty()
        || !secs.bytes().all(|b| b.is_ascii_digit())
        || frac.is_empty()
        || frac.len() > 9
    {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = secs.parse().ok()?;
    let nanos: u32 = format!("{frac:0<9}").parse().ok()?;
    Some(Duration::new(secs, nanos))
}

/// `dmesg -T`: `Tue Sep 15 00:01:30 2026`.
fn looks_like_date(s: &str) -> bool {
    let words: Vec<&str> = s.split_whitespace().collect();
    words.len() == 5
        && words[3].matches(':').count() == 2
        && words[4].bytes().all(|b| b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(text: &str, secs: Option<f64>) -> ReplayLine {
        ReplayLine {
            text: text.into(),
            since_boot: secs.map(Duration::from_secs_f64),
            from_kmsg: false,
        }
    }

    #[test]
    fn input_formats() {
        assert_eq!(parse_line(b"hello world"), line("hello world", None));
        assert_eq!(
            parse_line(b"[   12.500000] hello"),
            line("hello", Some(12.5))
        );
        assert_eq!(
            parse_line(b"[  512.079810][ T8305] BUG: x"),
            line("BUG: x", Some(512.07981))
        );
        assert_eq!(
            parse_line(b"[    1.000000] [    C1] y"),
            line("y", Some(1.0))
        );
        assert_eq!(parse_line(b"[Tue Sep 15 00:01:30 2026] z"), line("z", None));
        assert_eq!(parse_line(b"[not a time] z"), line("[not a time] z", None));
        let rec = parse_line(b"3,1234,5000000,-;task dd:1 blocked\\x0a");
        assert_eq!(rec.text, "task dd:1 blocked\n");
        assert_eq!(rec.since_boot, Some(Duration::from_secs(5)));
        assert!(rec.from_kmsg);
        assert_eq!(parse_line(b"\xff\xfeabc").text, "\u{fffd}\u{fffd}abc");
        assert!(is_dictionary_line(b" SUBSYSTEM=block"));
        assert!(!is_dictionary_line(b"      Tainted: G"));
    }

    #[test]
    fn long_lines_are_cut() {
        let mut input = io::Cursor::new([vec![b'a'; 100], b"\r\nb\n".to_vec()].concat());
        let mut buf = Vec::new();
        assert!(read_line_capped(&mut input, &mut buf, 10).unwrap());
        assert_eq!(buf, b"aaaaaaaaaa");
        assert!(read_line_capped(&mut input, &mut buf, 10).unwrap());
        assert_eq!(buf, b"b");
        assert!(!read_line_capped(&mut input, &mut buf, 10).unwrap());
    }
}
