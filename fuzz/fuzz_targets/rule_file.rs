//! Rule files (NPD system-log-monitor JSON and npd's structured rules) from anywhere: loading
//! never panics, and a file that loads runs: its rules see a log line, a hung task, an OOM kill
//! and a block error at times up to the end of the clock, and time out (recovery, windows).
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use npd_agent::{
    engine::Engine,
    event::{
        BlockError, BlockOp, ContainerRef, Detail, DevNum, HungTask, KernelEvent, LogMessage,
        OomKill, Owner, PodRef,
    },
    rules::RuleSet,
    time::Mono,
};

fuzz_target!(|data: &[u8]| {
    let Ok(rules) = RuleSet::from_sources([("fuzz.json", data)]) else {
        return;
    };
    let mut engine = Engine::new(rules);
    engine.initial_conditions(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
    let start = Mono::since_boot(Duration::from_secs(1_000));
    let details = [
        Detail::Log(LogMessage::new(String::from_utf8_lossy(data).into_owned())),
        Detail::Log(LogMessage::new(
            "INFO: task docker:20744 blocked for more than 120 seconds.",
        )),
        Detail::HungTask(HungTask {
            pid: 20744,
            comm: "docker".into(),
            owner: Some(Box::new(Owner {
                cgroup: Some("/kubepods/burstable/pod1234/abcd".into()),
                pods: vec![PodRef {
                    namespace: Some("default".into()),
                    name: Some("web".into()),
                    uid: "1234".into(),
                }],
                container: Some(ContainerRef {
                    name: Some("app".into()),
                    id: "abcd".into(),
                }),
            })),
        }),
        Detail::OomKill(OomKill {
            pid: 42,
            comm: Some("stress".into()),
            ..OomKill::default()
        }),
        Detail::BlockError(BlockError {
            device: Some("sda1".into()),
            dev: DevNum { major: 8, minor: 1 },
            sector: 2048,
            nr_sectors: 8,
            op: BlockOp::Write,
            rwbs: "WS".into(),
            error: -5,
            owner: None,
        }),
    ];
    let latest = Mono::ZERO.saturating_add(Duration::MAX);
    for now in [start, start.saturating_add(Duration::from_secs(3600)), latest] {
        for detail in &details {
            engine.handle(&KernelEvent::new(now, detail.clone()));
        }
        while let Some(at) = engine.next_deadline() {
            let reports = engine.on_deadline(at.max(now));
            if reports.is_empty() && at >= latest {
                break;
            }
            if reports.is_empty() {
                // Nothing due at its own deadline again would loop for ever.
                assert!(engine.next_deadline() != Some(at), "deadline {at:?} never fires");
            }
        }
    }
});
