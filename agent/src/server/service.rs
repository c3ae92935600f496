//! The RPC handlers: `grpc.AgentService` and `grpc.Health`.

use std::sync::Arc;
use std::time::Duration;

use protobuf::well_known_types::empty::Empty;
use protobuf::MessageField;
use ttrpc::{Code, TtrpcContext};

use super::call::{status, Call};
use super::guest::{self, Sysfs};
use super::process::{SpawnSpec, Table};
use super::{copy, netmap, passwd, sys};
use crate::proto::agent::{
    AgentDetails, CloseStdinRequest, CopyFileRequest, DestroySandboxRequest, ExecProcessRequest, GetMetricsRequest, GuestDetailsRequest, GuestDetailsResponse,
    Interfaces, ListInterfacesRequest, ListRoutesRequest, Metrics, OnlineCPUMemRequest, ReadStreamRequest, ReadStreamResponse, Routes, SetGuestDateTimeRequest,
    SignalProcessRequest, TtyWinResizeRequest, UpdateInterfaceRequest, UpdateRoutesRequest, WaitProcessRequest, WaitProcessResponse, WriteStreamRequest,
    WriteStreamResponse,
};
use crate::proto::health::{health_check_response::ServingStatus, CheckRequest, HealthCheckResponse, VersionCheckResponse};
use crate::proto::{agent_ttrpc, health_ttrpc, oci, types};
use crate::resources::Resources;

/// The agent's version, as Version and GetGuestDetails report it.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The protocol version Kata's agent reports as `grpc_version`.
pub const API_VERSION: &str = "0.0.1";

/// What DestroySandbox does after killing the exec'd processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDestroy {
    /// Send SIGUSR2 to this pid (init: an orderly poweroff).
    Signal(i32),
    /// Nothing more (host tests).
    Nothing,
}

pub struct Agent {
    pub table: Arc<Table>,
    pub sysfs: Sysfs,
    pub on_destroy: OnDestroy,
    pub etc: std::path::PathBuf,
    pub copies: copy::Copies,
}

fn empty() -> Empty {
    Empty::new()
}

impl Agent {
    /// Resolves the process's user: a name (with UID and GID 0) via /etc/passwd,
    /// supplementary groups from /etc/group plus those asked for.
    fn spawn_spec(&self, process: &oci::Process) -> ttrpc::Result<SpawnSpec> {
        let user = process.User.clone().unwrap_or_default();
        let passwd = std::fs::read_to_string(self.etc.join("passwd")).unwrap_or_default();
        let group = std::fs::read_to_string(self.etc.join("group")).unwrap_or_default();
        let (mut uid, mut gid) = (user.UID, user.GID);
        let mut groups = user.AdditionalGids.clone();
        let entry = if !user.Username.is_empty() && uid == 0 && gid == 0 {
            let entry = passwd::user_by_name(&passwd, &user.Username)
                .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("user {:?} is not in the guest's /etc/passwd", user.Username)))?;
            uid = entry.uid;
            gid = entry.gid;
            Some(entry)
        } else {
            passwd::user_by_uid(&passwd, uid)
        };
        if let Some(entry) = &entry {
            for g in passwd::member_groups(&group, &entry.name) {
                if g != gid && !groups.contains(&g) {
                    groups.push(g);
                }
            }
        }
        let mut env = process.Env.clone();
        if !env.iter().any(|e| e.starts_with("HOME=")) {
            let home = entry.as_ref().map_or("/", |e| e.home.as_str());
            env.push(format!("HOME={}", if home.is_empty() { "/" } else { home }));
        }
        let tty_size = process
            .ConsoleSize
            .as_ref()
            .filter(|b| b.Height > 0 && b.Width > 0)
            .map(|b| (b.Height.min(u32::from(u16::MAX)) as u16, b.Width.min(u32::from(u16::MAX)) as u16));
        Ok(SpawnSpec { args: process.Args.clone(), env, cwd: process.Cwd.clone(), uid, gid, groups, tty: process.Terminal, tty_size })
    }
}

impl agent_ttrpc::AgentService for Agent {
    fn exec_process(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let process = req.process.as_ref().ok_or_else(|| status(Code::INVALID_ARGUMENT, "ExecProcessRequest has no process"))?;
        let spec = self.spawn_spec(process)?;
        self.table.exec(&req.container_id, &req.exec_id, spec)?;
        Ok(empty())
    }

    fn signal_process(&self, _ctx: &TtrpcContext, req: SignalProcessRequest) -> ttrpc::Result<Empty> {
        self.table.signal(&req.container_id, &req.exec_id, req.signal)?;
        Ok(empty())
    }

    fn wait_process(&self, ctx: &TtrpcContext, req: WaitProcessRequest) -> ttrpc::Result<WaitProcessResponse> {
        let status = self.table.wait(&Call::new(ctx), &req.container_id, &req.exec_id)?;
        Ok(WaitProcessResponse { status, ..Default::default() })
    }

    fn write_stdin(&self, ctx: &TtrpcContext, req: WriteStreamRequest) -> ttrpc::Result<WriteStreamResponse> {
        let len = self.table.write(&Call::new(ctx), &req.container_id, &req.exec_id, &req.data)?;
        Ok(WriteStreamResponse { len, ..Default::default() })
    }

    fn read_stdout(&self, ctx: &TtrpcContext, req: ReadStreamRequest) -> ttrpc::Result<ReadStreamResponse> {
        let data = self.table.read(&Call::new(ctx), &req.container_id, &req.exec_id, true, req.len)?;
        Ok(ReadStreamResponse { data, ..Default::default() })
    }

    fn read_stderr(&self, ctx: &TtrpcContext, req: ReadStreamRequest) -> ttrpc::Result<ReadStreamResponse> {
        let data = self.table.read(&Call::new(ctx), &req.container_id, &req.exec_id, false, req.len)?;
        Ok(ReadStreamResponse { data, ..Default::default() })
    }

    fn close_stdin(&self, _ctx: &TtrpcContext, req: CloseStdinRequest) -> ttrpc::Result<Empty> {
        self.table.close_stdin(&req.container_id, &req.exec_id)?;
        Ok(empty())
    }

    fn tty_win_resize(&self, _ctx: &TtrpcContext, req: TtyWinResizeRequest) -> ttrpc::Result<Empty> {
        self.table.resize(&req.container_id, &req.exec_id, req.row, req.column)?;
        Ok(empty())
    }

    fn update_interface(&self, _ctx: &TtrpcContext, req: UpdateInterfaceRequest) -> ttrpc::Result<types::Interface> {
        let interface = req.interface.as_ref().ok_or_else(|| status(Code::INVALID_ARGUMENT, "empty update interface request"))?;
        netmap::update_interface(interface)
    }

    fn update_routes(&self, _ctx: &TtrpcContext, req: UpdateRoutesRequest) -> ttrpc::Result<Routes> {
        let routes = req.routes.as_ref().ok_or_else(|| status(Code::INVALID_ARGUMENT, "empty update routes request"))?;
        Ok(Routes { Routes: netmap::update_routes(&routes.Routes)?, ..Default::default() })
    }

    fn list_interfaces(&self, _ctx: &TtrpcContext, _req: ListInterfacesRequest) -> ttrpc::Result<Interfaces> {
        Ok(Interfaces { Interfaces: netmap::list_interfaces()?, ..Default::default() })
    }

    fn list_routes(&self, _ctx: &TtrpcContext, _req: ListRoutesRequest) -> ttrpc::Result<Routes> {
        Ok(Routes { Routes: netmap::list_routes()?, ..Default::default() })
    }

    fn get_metrics(&self, _ctx: &TtrpcContext, _req: GetMetricsRequest) -> ttrpc::Result<Metrics> {
        Ok(Metrics { metrics: Resources::collect().to_prometheus() + &super::agent_metrics(), ..Default::default() })
    }

    fn destroy_sandbox(&self, _ctx: &TtrpcContext, _req: DestroySandboxRequest) -> ttrpc::Result<Empty> {
        self.table.kill_all();
        if let OnDestroy::Signal(pid) = self.on_destroy {
            // Answer first; init's shutdown then stops this agent too.
            let spawned = std::thread::Builder::new().name("osb-poweroff".into()).stack_size(64 * 1024).spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                if let Err(e) = sys::kill(pid, libc::SIGUSR2) {
                    eprintln!("osb-agent: asking pid {pid} to power off: {e}");
                }
            });
            if spawned.is_err() {
                sys::kill(pid, libc::SIGUSR2).map_err(|e| status(Code::INTERNAL, format!("signal init: {e}")))?;
            }
        }
        Ok(empty())
    }

    fn online_cpu_mem(&self, _ctx: &TtrpcContext, req: OnlineCPUMemRequest) -> ttrpc::Result<Empty> {
        let sysfs = self.sysfs.clone();
        let work = move || -> ttrpc::Result<()> {
            if req.nb_cpus > 0 {
                sysfs.online_cpus(req.nb_cpus)?;
            }
            if !req.cpu_only {
                sysfs.online_memory()?;
            }
            Ok(())
        };
        if req.wait {
            work()?;
        } else {
            std::thread::Builder::new()
                .name("osb-online".into())
                .stack_size(64 * 1024)
                .spawn(move || {
                    if let Err(e) = work() {
                        eprintln!("osb-agent: OnlineCPUMem: {e:?}");
                    }
                })
                .map_err(|e| status(Code::RESOURCE_EXHAUSTED, format!("cannot start a thread: {e}")))?;
        }
        Ok(empty())
    }

    fn get_guest_details(&self, _ctx: &TtrpcContext, req: GuestDetailsRequest) -> ttrpc::Result<GuestDetailsResponse> {
        Ok(GuestDetailsResponse {
            mem_block_size_bytes: if req.mem_block_size { self.sysfs.mem_block_size()? } else { 0 },
            support_mem_hotplug_probe: req.mem_hotplug_probe && self.sysfs.mem_hotplug_probe(),
            agent_details: MessageField::some(AgentDetails {
                version: AGENT_VERSION.to_string(),
                init_daemon: std::process::id() == 1,
                device_handlers: Vec::new(),
                storage_handlers: Vec::new(),
                supports_seccomp: false,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    fn set_guest_date_time(&self, _ctx: &TtrpcContext, req: SetGuestDateTimeRequest) -> ttrpc::Result<Empty> {
        guest::set_date_time(req.Sec, req.Usec)?;
        Ok(empty())
    }

    fn copy_file(&self, _ctx: &TtrpcContext, req: CopyFileRequest) -> ttrpc::Result<Empty> {
        self.copies.copy_file(&req)?;
        Ok(empty())
    }
}

pub struct Health;

impl health_ttrpc::Health for Health {
    fn check(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<HealthCheckResponse> {
        Ok(HealthCheckResponse { status: ServingStatus::SERVING.into(), ..Default::default() })
    }

    fn version(&self, _ctx: &TtrpcContext, _req: CheckRequest) -> ttrpc::Result<VersionCheckResponse> {
        Ok(VersionCheckResponse { grpc_version: API_VERSION.to_string(), agent_version: AGENT_VERSION.to_string(), ..Default::default() })
    }
}
