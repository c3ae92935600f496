//! Generated protobuf messages and ttrpc bindings (from proto/*.proto).
#![allow(
    missing_docs,
    clippy::all,
    dead_code,
    unused_mut,
    unused_results,
    trivial_casts,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    unknown_lints,
    unused_imports
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}
pub mod health {
    include!(concat!(env!("OUT_DIR"), "/health.rs"));
}
pub mod health_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/health_ttrpc.rs"));
}
pub mod oci {
    include!(concat!(env!("OUT_DIR"), "/oci.rs"));
}
pub mod storage {
    include!(concat!(env!("OUT_DIR"), "/storage.rs"));
}
pub mod storage_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/storage_ttrpc.rs"));
}
pub mod types {
    include!(concat!(env!("OUT_DIR"), "/types.rs"));
}

/// Kata's field numbers, checked on the wire: each message is encoded with every
/// declared field set and compared with hand-assembled protobuf bytes
/// (tag = field number << 3 | wire type).
#[cfg(test)]
mod tests {
    use protobuf::Message;

    fn check<M: Message + std::fmt::Debug>(msg: &M, expected: &[u8]) {
        assert_eq!(msg.write_to_bytes().unwrap(), expected, "{}", std::any::type_name::<M>());
        assert_eq!(&M::parse_from_bytes(expected).unwrap(), msg);
    }

    #[test]
    fn field_numbers_are_katas() {
        use super::agent::*;
        use super::{oci, types};
        let process = oci::Process {
            Terminal: true,
            ConsoleSize: protobuf::MessageField::some(oci::Box { Height: 1, Width: 2, ..Default::default() }),
            User: protobuf::MessageField::some(oci::User { UID: 3, GID: 4, AdditionalGids: vec![5], Username: "u".into(), ..Default::default() }),
            Args: vec!["a".into()],
            Env: vec!["e".into()],
            Cwd: "c".into(),
            ..Default::default()
        };
        let process_bytes = [
            0x08, 1, // Terminal = 1
            0x12, 4, 0x08, 1, 0x10, 2, // ConsoleSize = 2 { Height = 1, Width = 2 }
            0x1a, 10, 0x08, 3, 0x10, 4, 0x1a, 1, 5, 0x22, 1, b'u', // User = 3 {UID 1, GID 2, AdditionalGids 3 (packed), Username 4}
            0x22, 1, b'a', // Args = 4
            0x2a, 1, b'e', // Env = 5
            0x32, 1, b'c', // Cwd = 6
        ];
        check(&process, &process_bytes);
        let exec = ExecProcessRequest { container_id: "x".into(), exec_id: "y".into(), process: protobuf::MessageField::some(process), ..Default::default() };
        let mut exec_bytes = vec![0x0a, 1, b'x', 0x12, 1, b'y', 0x22, process_bytes.len() as u8];
        exec_bytes.extend_from_slice(&process_bytes);
        check(&exec, &exec_bytes);
        check(
            &SignalProcessRequest { container_id: "x".into(), exec_id: "y".into(), signal: 9, ..Default::default() },
            &[0x0a, 1, b'x', 0x12, 1, b'y', 0x18, 9],
        );
        check(&WaitProcessResponse { status: 137, ..Default::default() }, &[0x08, 137, 1]);
        check(
            &WriteStreamRequest { container_id: "x".into(), exec_id: "y".into(), data: vec![7], ..Default::default() },
            &[0x0a, 1, b'x', 0x12, 1, b'y', 0x1a, 1, 7],
        );
        check(&WriteStreamResponse { len: 3, ..Default::default() }, &[0x08, 3]);
        check(&ReadStreamRequest { container_id: "x".into(), exec_id: "y".into(), len: 5, ..Default::default() }, &[0x0a, 1, b'x', 0x12, 1, b'y', 0x18, 5]);
        check(&ReadStreamResponse { data: vec![1], ..Default::default() }, &[0x0a, 1, 1]);
        check(
            &TtyWinResizeRequest { container_id: "x".into(), exec_id: "y".into(), row: 2, column: 3, ..Default::default() },
            &[0x0a, 1, b'x', 0x12, 1, b'y', 0x18, 2, 0x20, 3],
        );
        check(&OnlineCPUMemRequest { wait: true, nb_cpus: 2, cpu_only: true, ..Default::default() }, &[0x08, 1, 0x10, 2, 0x18, 1]);
        check(
            &GuestDetailsResponse {
                mem_block_size_bytes: 1,
                agent_details: protobuf::MessageField::some(AgentDetails {
                    version: "v".into(),
                    init_daemon: true,
                    device_handlers: vec!["d".into()],
                    storage_handlers: vec!["s".into()],
                    supports_seccomp: true,
                    ..Default::default()
                }),
                support_mem_hotplug_probe: true,
                ..Default::default()
            },
            &[0x08, 1, 0x12, 13, 0x0a, 1, b'v', 0x10, 1, 0x1a, 1, b'd', 0x22, 1, b's', 0x28, 1, 0x18, 1],
        );
        check(&GuestDetailsRequest { mem_block_size: true, mem_hotplug_probe: true, ..Default::default() }, &[0x08, 1, 0x10, 1]);
        check(&SetGuestDateTimeRequest { Sec: 1, Usec: 2, ..Default::default() }, &[0x08, 1, 0x10, 2]);
        check(
            &CopyFileRequest { path: "p".into(), file_size: 1, file_mode: 2, dir_mode: 3, uid: 4, gid: 5, offset: 6, data: vec![7], ..Default::default() },
            &[0x0a, 1, b'p', 0x10, 1, 0x18, 2, 0x20, 3, 0x28, 4, 0x30, 5, 0x38, 6, 0x42, 1, 7],
        );
        check(&Metrics { metrics: "m".into(), ..Default::default() }, &[0x0a, 1, b'm']);
        let iface = types::Interface {
            device: "d".into(),
            name: "n".into(),
            IPAddresses: vec![types::IPAddress { family: types::IPFamily::v6.into(), address: "a".into(), mask: "m".into(), ..Default::default() }],
            mtu: 9,
            hwAddr: "h".into(),
            devicePath: "p".into(),
            type_: "t".into(),
            raw_flags: 1,
            ..Default::default()
        };
        let iface_bytes =
            [0x0a, 1, b'd', 0x12, 1, b'n', 0x1a, 8, 0x08, 1, 0x12, 1, b'a', 0x1a, 1, b'm', 0x20, 9, 0x2a, 1, b'h', 0x32, 1, b'p', 0x3a, 1, b't', 0x40, 1];
        check(&iface, &iface_bytes);
        let mut update = vec![0x0a, iface_bytes.len() as u8];
        update.extend_from_slice(&iface_bytes);
        check(&UpdateInterfaceRequest { interface: protobuf::MessageField::some(iface.clone()), ..Default::default() }, &update);
        let mut list = vec![0x0a, iface_bytes.len() as u8];
        list.extend_from_slice(&iface_bytes);
        check(&Interfaces { Interfaces: vec![iface], ..Default::default() }, &list);
        let route = types::Route {
            dest: "d".into(),
            gateway: "g".into(),
            device: "v".into(),
            source: "s".into(),
            scope: 1,
            family: types::IPFamily::v6.into(),
            flags: 2,
            ..Default::default()
        };
        let route_bytes = [0x0a, 1, b'd', 0x12, 1, b'g', 0x1a, 1, b'v', 0x22, 1, b's', 0x28, 1, 0x30, 1, 0x38, 2];
        check(&route, &route_bytes);
        let mut routes = vec![0x0a, route_bytes.len() as u8];
        routes.extend_from_slice(&route_bytes);
        check(&Routes { Routes: vec![route.clone()], ..Default::default() }, &routes);
        let mut update_routes = vec![0x0a, routes.len() as u8];
        update_routes.extend_from_slice(&routes);
        check(
            &UpdateRoutesRequest { routes: protobuf::MessageField::some(Routes { Routes: vec![route], ..Default::default() }), ..Default::default() },
            &update_routes,
        );
        use super::health::*;
        check(&CheckRequest { service: "s".into(), ..Default::default() }, &[0x0a, 1, b's']);
        check(&HealthCheckResponse { status: health_check_response::ServingStatus::NOT_SERVING.into(), ..Default::default() }, &[0x08, 2]);
        check(&VersionCheckResponse { grpc_version: "g".into(), agent_version: "a".into(), ..Default::default() }, &[0x0a, 1, b'g', 0x12, 1, b'a']);
    }
}
