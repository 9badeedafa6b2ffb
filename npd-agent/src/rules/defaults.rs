//! The embedded default rules, the files in the repository's `config/` directory:
//! NPD's `kernel-monitor.json` and `readonly-monitor.json` (byte for byte NPD's), npd's
//! `kernel-monitor-current.json` (current kernels' wording of the same problems, same reasons)
//! and `structured.json` (the eBPF events, same reasons).

/// (name, content) of each default file, in load order.
pub const FILES: [(&str, &str); 4] = [
    (
        "<embedded>/config/kernel-monitor.json",
        include_str!("../../../config/kernel-monitor.json"),
    ),
    (
        "<embedded>/config/readonly-monitor.json",
        include_str!("../../../config/readonly-monitor.json"),
    ),
    (
        "<embedded>/config/kernel-monitor-current.json",
        include_str!("../../../config/kernel-monitor-current.json"),
    ),
    (
        "<embedded>/config/structured.json",
        include_str!("../../../config/structured.json"),
    ),
];
