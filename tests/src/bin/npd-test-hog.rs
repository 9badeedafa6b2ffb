//! A small process that integration tests make misbehave in a known way, so that its pid and
//! comm (`npd-test-hog`) are known:
//!
//! * `npd-test-hog oom CGROUP_DIR MIB`: joins the memory cgroup, then allocates and touches
//!   MIB MiB (the cgroup's OOM killer kills it).
//! * `npd-test-hog write FILE`: writes to FILE (blocks in D state on a frozen file system).
//!
//! It prints `ready` when it is about to misbehave.
use std::io::Write as _;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("oom") if args.len() == 4 => {
            let procs = std::path::Path::new(&args[2]).join("cgroup.procs");
            std::fs::write(&procs, std::process::id().to_string())
                .unwrap_or_else(|e| fail(&format!("joining {}: {e}", procs.display())));
            let mib: usize = args[3]
                .parse()
                .unwrap_or_else(|_| fail("MIB is not a number"));
            println!("ready");
            let _ = std::io::stdout().flush();
            let mut chunks = Vec::new();
            for _ in 0..mib {
                // Touch every page so it is really charged to the cgroup.
                chunks.push(vec![1u8; 1 << 20]);
            }
            println!("allocated {} MiB without being killed", chunks.len());
            std::process::exit(3);
        }
        Some("write") if args.len() == 3 => {
            println!("ready");
            let _ = std::io::stdout().flush();
            std::fs::write(&args[2], b"npd hung task test\n")
                .unwrap_or_else(|e| fail(&format!("write: {e}")));
        }
        _ => fail("usage: npd-test-hog oom CGROUP_DIR MIB | write FILE"),
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("npd-test-hog: {msg}");
    std::process::exit(2);
}
