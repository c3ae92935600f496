//! The agent as a program of its own (the guest links it into `osb-init` instead).

fn main() {
    std::process::exit(osb_agent::server::main(std::env::args_os()));
}
