//! `/dev/kmsg` records (`PRI,SEQ,USEC,FLAGS;text` with `\xNN` escapes and dictionary lines):
//! parsing never panics, and loss counting from sequence numbers never overflows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use npd_agent::sensor::kmsg::{SequenceTracker, parse_record};

fuzz_target!(|data: &[u8]| {
    let mut seq = SequenceTracker::default();
    // One record per line, as a file given to --kmsg-path holds them.
    for raw in data.split(|&b| b == b'\n') {
        if let Some(record) = parse_record(raw) {
            seq.observe(record.seq);
            // A newline in the text can only come from an escape (`\x0a`, `\x0A`).
            assert!(!record.text.contains('\n') || raw.windows(2).any(|w| w == b"\\x"));
        }
    }
});
