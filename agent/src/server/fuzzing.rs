//! Entry point of the fuzz target `ttrpc` in `fuzz/` (cargo-fuzz), and its
//! replay in `cargo test`. Present only in test builds and with
//! `--cfg fuzzing`: the guest binary carries none of it.
//!
//! The real server ([`rpc::serve`]) with the real handlers listens on a Unix
//! socket in this process; each input is sent on a fresh connection as the
//! raw byte stream a client would send (frames, or garbage), the sending side
//! is closed, and every byte the agent answers is read back. The agent must
//! close the connection (within [`ANSWER_TIMEOUT`]), answer only whole
//! response frames carrying a decodable `Response`, and never panic.
//!
//! Handlers that change the host the fuzzer runs on (ExecProcess spawns the
//! command it is given, UpdateInterface/UpdateRoutes reconfigure the network,
//! SetGuestDateTime sets the clock, CopyFile writes any path, OnlineCPUMem
//! writes sysfs) are replaced by one that only decodes their request message
//! and answers UNIMPLEMENTED; every other handler runs as in the guest.

use std::io::{Read, Write};
use std::marker::PhantomData;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use protobuf::Message;
use ttrpc::proto::{MESSAGE_HEADER_LENGTH, MESSAGE_TYPE_RESPONSE};
use ttrpc::{Code, MethodHandler, Request, Response, TtrpcContext};

use super::{guest, process, rpc, service};
use crate::proto::{agent, agent_ttrpc, health_ttrpc};

/// How long the agent may take to answer and close a connection (below the
/// 10 s per input `cargo xtask fuzz` gives libFuzzer, so a hang is named here).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(8);

/// Answers a method that would change the host after decoding its request.
struct DecodeOnly<M>(PhantomData<fn() -> M>);

impl<M: Message> MethodHandler for DecodeOnly<M> {
    fn handler(&self, _ctx: TtrpcContext, req: Request) -> ttrpc::Result<()> {
        M::parse_from_bytes(&req.payload).map_err(|e| ttrpc::Error::Others(e.to_string()))?;
        Err(super::call::status(Code::UNIMPLEMENTED, "not run under the fuzzer: it changes the host"))
    }
}

fn decode_only<M: Message>() -> Box<dyn MethodHandler + Send + Sync> {
    Box::new(DecodeOnly::<M>(PhantomData))
}

/// The socket of the agent this process serves (started on first use).
fn agent_socket() -> &'static PathBuf {
    static SOCKET: OnceLock<PathBuf> = OnceLock::new();
    SOCKET.get_or_init(|| {
        super::sys::ignore_sigpipe();
        let dir = std::env::temp_dir().join(format!("osb-agent-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a directory for the fuzzed agent's socket");
        let socket = dir.join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind the fuzzed agent's socket");
        let agent = service::Agent {
            table: Arc::new(process::Table::new(super::MAX_PROCESSES)),
            sysfs: guest::Sysfs { root: dir.join("sys") },
            on_destroy: service::OnDestroy::Nothing,
            etc: dir.join("etc"),
            copies: Default::default(),
        };
        let mut methods = agent_ttrpc::create_agent_service(Arc::new(agent));
        let mut replace = |method: &str, handler| {
            let path = format!("/grpc.AgentService/{method}");
            assert!(methods.insert(path.clone(), handler).is_some(), "{path} is a method of the agent");
        };
        replace("ExecProcess", decode_only::<agent::ExecProcessRequest>());
        replace("UpdateInterface", decode_only::<agent::UpdateInterfaceRequest>());
        replace("UpdateRoutes", decode_only::<agent::UpdateRoutesRequest>());
        replace("SetGuestDateTime", decode_only::<agent::SetGuestDateTimeRequest>());
        replace("CopyFile", decode_only::<agent::CopyFileRequest>());
        replace("OnlineCPUMem", decode_only::<agent::OnlineCPUMemRequest>());
        let dispatcher = rpc::Dispatcher::new([methods, health_ttrpc::create_health(Arc::new(service::Health))]);
        std::thread::spawn(move || rpc::serve(rpc::Listener::Unix(listener), dispatcher, rpc::Limits::default()));
        socket
    })
}

/// Target `ttrpc`: the bytes as what a client sends on one connection.
pub fn ttrpc(data: &[u8]) {
    exchange(data);
}

/// Sends `data` on a fresh connection; the responses, in the order they came.
fn exchange(data: &[u8]) -> Vec<Response> {
    if let Some(head) = data.first_chunk::<MESSAGE_HEADER_LENGTH>() {
        assert_eq!(&rpc::encode_header(&rpc::decode_header(head)), head, "the header codec round-trips");
    }
    let stream = UnixStream::connect(agent_socket()).expect("connect to the fuzzed agent");
    stream.set_read_timeout(Some(ANSWER_TIMEOUT)).expect("SO_RCVTIMEO");
    let mut writer = stream.try_clone().expect("clone the connection");
    let input = data.to_vec();
    // Written from another thread: the agent answers while it reads.
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&input); // the agent may close first
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });
    let mut answer = Vec::new();
    if let Err(e) = (&stream).read_to_end(&mut answer) {
        panic!("the agent did not close the connection within {ANSWER_TIMEOUT:?} ({e}); {} bytes answered", answer.len());
    }
    sender.join().expect("the sender thread");
    responses(&answer)
}

/// The agent's bytes are whole response frames, each a decodable `Response`.
fn responses(mut answer: &[u8]) -> Vec<Response> {
    let mut out = Vec::new();
    while !answer.is_empty() {
        let head = answer.first_chunk::<MESSAGE_HEADER_LENGTH>().unwrap_or_else(|| panic!("a cut frame header: {answer:?}"));
        let header = rpc::decode_header(head);
        assert_eq!(header.type_, MESSAGE_TYPE_RESPONSE, "the agent sends only responses: {header:?}");
        let end = MESSAGE_HEADER_LENGTH + header.length as usize;
        let payload = answer.get(MESSAGE_HEADER_LENGTH..end).unwrap_or_else(|| panic!("a cut frame: {header:?}"));
        out.push(Response::parse_from_bytes(payload).unwrap_or_else(|e| panic!("an undecodable response ({e}): {payload:?}")));
        answer = &answer[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// The target reaches the handlers: the seeds are answered as a client expects.
    #[test]
    fn seeds_are_answered() {
        let seeds = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/ttrpc");
        let answer = |name: &str| super::exchange(&std::fs::read(seeds.join(name)).unwrap());
        let codes = |name: &str| -> Vec<i32> { answer(name).iter().map(|r| r.status.code.value()).collect() };
        assert_eq!(codes("health-check"), [0]);
        assert_eq!(codes("unknown"), [ttrpc::Code::UNIMPLEMENTED as i32; 2]);
        // Stream 2 (even) refused, stream 1 answered, stream 1 again refused; in any order.
        let mut bad = codes("bad-streams");
        bad.sort();
        assert_eq!(bad, [0, ttrpc::Code::INVALID_ARGUMENT as i32, ttrpc::Code::INVALID_ARGUMENT as i32]);
        let exec = answer("exec");
        assert_eq!(exec.len(), 1);
        assert!(exec[0].status.message.contains("not run under the fuzzer"), "{:?}", exec[0].status);
        assert_eq!(codes("garbage").len(), 0, "an undecodable frame header ends the connection or is ignored");
    }

    #[test]
    fn fuzz_inputs_ttrpc() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        let mut inputs = Vec::new();
        for kind in ["corpus", "regressions"] {
            if let Ok(entries) = std::fs::read_dir(root.join(kind).join("ttrpc")) {
                inputs.extend(entries.map(|e| e.expect("read a fuzz input directory").path()));
            }
        }
        inputs.sort();
        assert!(!inputs.is_empty(), "no committed inputs for fuzz target ttrpc");
        let failed: Vec<_> = inputs
            .iter()
            .filter(|path| {
                let data = std::fs::read(path).expect("read a fuzz input");
                std::panic::catch_unwind(|| super::ttrpc(&data)).is_err()
            })
            .collect();
        assert!(failed.is_empty(), "fuzz target ttrpc panicked on {failed:#?}");
    }
}
