//! `grpc.StorageService`: volumes mounted after boot (MountStorage), unmounted
//! (UnmountStorage) and listed with the boot's own (ListStorages). The mounting itself
//! is [`crate::volume`], the code init runs for the run config's `mounts`.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use protobuf::well_known_types::empty::Empty;
use protobuf::MessageField;
use ttrpc::{Code, TtrpcContext};

use super::call::status;
use crate::proto::storage::{
    ListStoragesRequest, ListStoragesResponse, MountStorageRequest, MountStorageResponse, Storage, StorageState, UnmountStorageRequest,
};
use crate::proto::storage_ttrpc;
use crate::volume::{self, MountSpec, Ops};

/// At most this many storages are tracked (boot's and the agent's together).
pub const MAX_STORAGES: usize = 256;

#[derive(Clone, Debug)]
struct Entry {
    storage: Storage,
    mounted: bool,
    error: String,
    origin: &'static str,
    device: String,
}

/// The storages known so far, in the order they came.
#[derive(Default)]
pub struct Storages {
    entries: Mutex<Vec<Entry>>,
    /// Mounts are made one at a time (a device wait must not let a second mount race
    /// the first onto the same mount point).
    busy: Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Storages {
    fn push(&self, entry: Entry) {
        let mut entries = lock(&self.entries);
        entries.retain(|e| e.mounted || e.storage.mount_point != entry.storage.mount_point);
        if entries.len() >= MAX_STORAGES {
            // The oldest failed entry makes room; mounted ones are kept.
            if let Some(i) = entries.iter().position(|e| !e.mounted) {
                entries.remove(i);
            }
        }
        entries.push(entry);
    }

    /// A mount init made at boot (`line`: the spec in fstab form; `error` empty when it
    /// is mounted).
    pub fn boot_mount(&self, line: &str, device: &str, error: &str) {
        let storage = match MountSpec::parse_line(line) {
            Ok(spec) => spec.to_storage(),
            Err(e) => {
                eprintln!("osb-agent: boot mount {line:?}: {e}");
                return;
            }
        };
        self.push(Entry { storage, mounted: error.is_empty(), error: error.to_owned(), origin: "boot", device: device.to_owned() });
    }

    pub fn mount(&self, ops: &mut dyn Ops, storage: &Storage) -> ttrpc::Result<MountStorageResponse> {
        let mut spec = MountSpec::from_storage(storage).map_err(|e| status(Code::INVALID_ARGUMENT, e.0))?;
        spec.wait = Some(spec.wait.unwrap_or(volume::DEFAULT_DEVICE_WAIT).min(MAX_WAIT));
        let target = spec.target.clone();
        let _one = lock(&self.busy);
        {
            let entries = lock(&self.entries);
            if entries.iter().any(|e| e.mounted && e.storage.mount_point == target) {
                return Err(status(Code::ALREADY_EXISTS, format!("{target} is already mounted (UnmountStorage it first)")));
            }
            if entries.iter().filter(|e| e.mounted).count() >= MAX_STORAGES {
                return Err(status(Code::RESOURCE_EXHAUSTED, format!("{MAX_STORAGES} storages are mounted already; unmount one first")));
            }
        }
        // Symbolic links in the mount point are refused: guest processes may have made them.
        let done = volume::mount(ops, &spec, false, &[]).map_err(|e| {
            let code = if e.timed_out { Code::DEADLINE_EXCEEDED } else { Code::FAILED_PRECONDITION };
            status(code, e.to_string())
        })?;
        let mut listed = storage.clone();
        listed.mount_point = target;
        self.push(Entry { storage: listed, mounted: true, error: String::new(), origin: "agent", device: done.device.clone() });
        Ok(MountStorageResponse { device: done.device, fstype: done.fstype, ..Default::default() })
    }

    pub fn unmount(&self, ops: &mut dyn Ops, mount_point: &str, detach: bool) -> ttrpc::Result<()> {
        let target = if mount_point.len() > 1 { mount_point.trim_end_matches('/') } else { mount_point };
        let _one = lock(&self.busy);
        let known = lock(&self.entries).iter().any(|e| e.mounted && e.storage.mount_point == target);
        if !known {
            return Err(status(Code::NOT_FOUND, format!("{mount_point} is not a storage this guest mounted (ListStorages lists them)")));
        }
        if let Some(inner) =
            lock(&self.entries).iter().find(|e| e.mounted && e.storage.mount_point != target && volume::is_under(&e.storage.mount_point, target))
        {
            return Err(status(Code::FAILED_PRECONDITION, format!("{} is mounted inside {target}: unmount it first", inner.storage.mount_point)));
        }
        volume::unmount(ops, target, detach).map_err(|e| {
            let code = if e.raw_os_error() == Some(libc::EBUSY) { Code::FAILED_PRECONDITION } else { Code::INTERNAL };
            let hint = if e.raw_os_error() == Some(libc::EBUSY) { "; files on it are open (detach unmounts anyway)" } else { "" };
            status(code, format!("unmount {target}: {e}{hint}"))
        })?;
        lock(&self.entries).retain(|e| !(e.mounted && e.storage.mount_point == target));
        Ok(())
    }

    pub fn list(&self) -> Vec<StorageState> {
        lock(&self.entries)
            .iter()
            .map(|e| StorageState {
                storage: MessageField::some(e.storage.clone()),
                mounted: e.mounted,
                error: e.error.clone(),
                origin: e.origin.to_owned(),
                device: e.device.clone(),
                ..Default::default()
            })
            .collect()
    }
}

/// The ttrpc service over the guest's real system calls.
pub struct Service(pub std::sync::Arc<Storages>);

impl storage_ttrpc::StorageService for Service {
    fn mount_storage(&self, _ctx: &TtrpcContext, req: MountStorageRequest) -> ttrpc::Result<MountStorageResponse> {
        let storage = req.storage.as_ref().ok_or_else(|| status(Code::INVALID_ARGUMENT, "MountStorageRequest has no storage"))?;
        self.0.mount(&mut volume::Linux, storage)
    }

    fn unmount_storage(&self, _ctx: &TtrpcContext, req: UnmountStorageRequest) -> ttrpc::Result<Empty> {
        self.0.unmount(&mut volume::Linux, &req.mount_point, req.detach)?;
        Ok(Empty::new())
    }

    fn list_storages(&self, _ctx: &TtrpcContext, _req: ListStoragesRequest) -> ttrpc::Result<ListStoragesResponse> {
        Ok(ListStoragesResponse { storages: self.0.list(), ..Default::default() })
    }
}

/// How long MountStorage may wait for a device at most, whatever the options say.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_mounts_are_listed_and_replaced() {
        let table = Storages::default();
        table.boot_mount("LABEL=data /data ext4 rw,noatime", "/dev/vdb", "");
        table.boot_mount("/dev/vdz /never ext4 rw,nofail", "", "device /dev/vdz not there after 0.2 s");
        table.boot_mount("not a line", "", "");
        let list = table.list();
        assert_eq!(list.len(), 2);
        assert_eq!((list[0].mounted, list[0].origin.as_str(), list[0].device.as_str()), (true, "boot", "/dev/vdb"));
        assert_eq!(list[0].storage.options, ["rw", "noatime"]);
        assert_eq!(list[1].storage.options, ["rw", "nofail"]);
        assert_eq!((list[1].mounted, list[1].error.as_str()), (false, "device /dev/vdz not there after 0.2 s"));
    }
}
