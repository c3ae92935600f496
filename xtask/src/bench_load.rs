//! The load section of `cargo xtask bench`: the guest load test
//! (`osbuilder/tests/guest_load.rs`) with the full 1 GiB stream through
//! `cat`, which the suite runs at 128 MiB (about 5 MB/s under TCG: 1 GiB is
//! some minutes, too long for every run). Its figures (health checks and
//! exec/wait round trips per second from 32 clients, stream MB/s, the
//! agent's RSS before and after) are the test's own printed lines.

use crate::util::{ci_tool, guest_init_binary, project_root, Cmd};

pub fn run() -> anyhow::Result<()> {
    let base = crate::image::base_image()?;
    let init = guest_init_binary()?;
    let vhost = ci_tool("vhost-device-vsock")?;
    Cmd::new("cargo")
        .args(["test", "--quiet", "-p", "osbuilder", "--test", "guest_load", "the_agent_serves_under_load", "--", "--nocapture"])
        .cwd(project_root())
        .env("OSBUILDER_BASE_IMAGE", base)
        .env("OSBUILDER_GUEST_INIT", init)
        .env("OSBUILDER_VHOST_DEVICE_VSOCK", vhost)
        .env("OSBUILDER_LOAD_STREAM_MIB", "1024")
        .run()
}
