//! Ring-buffer records through the decoder, with the tracepoint layouts of each of the five
//! kernels npd is tested against (`npd-agent/testdata/formats`). A record is either the input
//! as it is (any header), or, to reach the field decoders, a well-formed header of the kind and
//! kernel the first bytes choose around the rest of the input. Nothing may panic.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use npd_agent::sensor::{
    decode::{Layouts, decode_record},
    format::TracepointFormat,
};
use npd_common::{HEADER_LEN, RecordKind};

macro_rules! kernel {
    ($dir:literal) => {
        [
            include_str!(concat!("../../npd-agent/testdata/formats/", $dir, "/sched_sched_process_hang.format")),
            include_str!(concat!("../../npd-agent/testdata/formats/", $dir, "/oom_mark_victim.format")),
            include_str!(concat!("../../npd-agent/testdata/formats/", $dir, "/block_block_rq_error.format")),
            include_str!(concat!("../../npd-agent/testdata/formats/", $dir, "/block_block_rq_complete.format")),
        ]
    };
}

const KERNELS: [[&str; 4]; 5] = [
    kernel!("5.10.0-32-cloud-amd64"),
    kernel!("6.1.0-50-cloud-amd64"),
    kernel!("6.12.107+deb13-cloud-amd64"),
    kernel!("6.18.44"),
    kernel!("7.2.13+deb14-cloud-amd64"),
];

/// Each kernel's layouts, as the agent sets them up (block errors from `block_rq_error`, or
/// `block_rq_complete` where the kernel lacks it).
fn layouts() -> &'static [Layouts] {
    static LAYOUTS: OnceLock<Vec<Layouts>> = OnceLock::new();
    LAYOUTS.get_or_init(|| {
        KERNELS
            .iter()
            .map(|[hang, oom, error, complete]| {
                let parse = |text: &str| TracepointFormat::parse(text, "fuzz").ok();
                let mut l = Layouts::default();
                l.set_hung_task(&parse(hang).expect("hung-task format")).expect("hung-task layout");
                l.set_oom(&parse(oom).expect("oom format")).expect("oom layout");
                // 5.10 has no block_rq_error (its file says MISSING): block_rq_complete then.
                let block = parse(error).filter(|f| f.field("dev").is_some());
                let block = block.or_else(|| parse(complete)).expect("a block format");
                l.set_block(&block).expect("block layout");
                l
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let kernel = &layouts()[usize::from(choice & 0x7) % KERNELS.len()];
    if choice & 0x80 != 0 {
        let _ = decode_record(rest, kernel);
        return;
    }
    let kinds = RecordKind::ALL;
    let kind = kinds[usize::from(choice >> 3 & 0x7) % kinds.len()] as u32;
    let mut record = Vec::with_capacity(HEADER_LEN + rest.len());
    let len = rest.len() as u32;
    for word in [kind, 0] {
        record.extend_from_slice(&word.to_ne_bytes());
    }
    record.extend_from_slice(&0u64.to_ne_bytes());
    // The original length may claim more than was copied (a truncated console message).
    let orig_len = if choice & 0x40 != 0 { len.saturating_mul(3) } else { len };
    for word in [len, orig_len] {
        record.extend_from_slice(&word.to_ne_bytes());
    }
    record.extend_from_slice(rest);
    let _ = decode_record(&record, kernel);
});
