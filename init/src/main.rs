//! One static guest binary, two personalities: PID 1, or the agent when
//! started as `osb-agent` (argv[0]) or `osb-init agent ...`.

use std::ffi::OsString;
use std::path::Path;

/// Whether the agent is linked in (the `agent` feature).
const AGENT_LINKED: bool = cfg!(feature = "agent");

#[cfg(feature = "agent")]
fn agent_main(args: Vec<OsString>) -> i32 {
    osb_agent::server::main(args)
}

#[cfg(not(feature = "agent"))]
fn agent_main(_args: Vec<OsString>) -> i32 {
    eprintln!("osb-agent: not linked into this osb-init (build it with --features agent)");
    2
}

fn main() {
    let mut args: Vec<OsString> = std::env::args_os().collect();
    let argv0 = args.first().map(|a| Path::new(a).file_name().unwrap_or_default().to_owned()).unwrap_or_default();
    if argv0 == "osb-agent" {
        std::process::exit(agent_main(args));
    }
    if args.get(1).is_some_and(|a| a == "agent") {
        args.remove(1);
        std::process::exit(agent_main(args));
    }
    osb_init::pid1::main(AGENT_LINKED)
}
