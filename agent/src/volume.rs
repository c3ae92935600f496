//! Guest volumes: what to mount where, shared by init (the run config's `mounts` and
//! `osb.mount=`, at boot) and the agent (its storage calls, after boot).
//!
//! A [`MountSpec`] is one mount: a source (a block device by path, `LABEL=`, `UUID=` or
//! `SERIAL=`; a virtio-fs or 9p tag; an NFS `server:/export`; a directory to bind; or
//! nothing for tmpfs), a target, a type, options, how long to wait for the device, the
//! owner and mode of the mounted root, and whether a failure stops the boot. The same
//! text form as an fstab line (`SOURCE TARGET [TYPE [OPTIONS]]`, our settings as
//! `x-osb.*` options and `nofail`) is what `osb.mount=` and `osbuilder --mount` take.
//! [`order`] puts a list in dependency order; [`mount`] carries one out through
//! [`Ops`], the few system calls it needs ([`Linux`] is the real one; the tests use a
//! recording double).
//!
//! Without udev there is no `/dev/disk/by-*`: labels and UUIDs are read from the
//! filesystems' superblocks here ([`probe`]: ext2/3/4, erofs, XFS, btrfs, FAT), serials
//! from sysfs (virtio-blk `serial`, SCSI VPD page 0x80). Hand-written because the one
//! library that does this (libblkid) is C, and reading five superblocks' label and UUID
//! fields is a few dozen lines.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use crate::proto::storage::Storage;

/// How long a block device is waited for when the spec does not say.
pub const DEFAULT_DEVICE_WAIT: Duration = Duration::from_secs(5);
/// How often a missing device is looked for again.
const POLL: Duration = Duration::from_millis(20);
/// Enough of a device to read every superblock [`probe`] knows (btrfs's is at 64 KiB).
pub const PROBE_BYTES: usize = 64 * 1024 + 4096;

/// One mount.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountSpec {
    /// As written: `/dev/vdb`, `LABEL=data`, `UUID=...`, `SERIAL=...`, a tag,
    /// `server:/export`, a directory (bind), anything for tmpfs.
    pub source: String,
    /// Absolute, without `.` or `..` components.
    pub target: String,
    /// `None` or `auto`: a block device's type is read from its superblock.
    pub fstype: Option<String>,
    /// Mount options (flag words such as `noatime` and filesystem data alike), without
    /// the ones this module consumes (`ro`/`rw`, `nofail`, `defaults`, `x-osb.*`).
    pub options: Vec<String>,
    /// How long to wait for the device (block sources) or the tag (none are waited for:
    /// a virtio-fs or 9p device exists before init runs).
    pub wait: Option<Duration>,
    pub read_only: bool,
    /// Owner and mode of the mounted filesystem's root directory (tmpfs: its
    /// `uid=`/`gid=`/`mode=` options).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u32>,
    /// A failure is reported and the boot goes on (fstab's `nofail`); else it stops it.
    pub nofail: bool,
}

/// A block device named by one of its properties.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceRef {
    Path(String),
    Label(String),
    Uuid(String),
    Serial(String),
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRef::Path(p) => f.write_str(p),
            DeviceRef::Label(l) => write!(f, "LABEL={l}"),
            DeviceRef::Uuid(u) => write!(f, "UUID={u}"),
            DeviceRef::Serial(s) => write!(f, "SERIAL={s}"),
        }
    }
}

/// What a spec mounts, decided from its type and source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Block(DeviceRef),
    VirtioFs {
        tag: String,
    },
    NineP {
        tag: String,
    },
    /// `server` is an address (IPv6 without brackets) or a name.
    Nfs {
        server: String,
        export: String,
        v4: bool,
    },
    Tmpfs,
    Bind {
        from: String,
    },
    /// Any other type, mounted as given (proc, sysfs, overlay, ...).
    Other,
}

/// A spec that cannot be carried out as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError(pub String);

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpecError {}

fn spec_err<T>(message: impl Into<String>) -> Result<T, SpecError> {
    Err(SpecError(message.into()))
}

/// Checks a mount target: absolute, no `.`/`..`/empty components, not `/`.
pub fn check_target(target: &str) -> Result<(), SpecError> {
    if !target.starts_with('/') {
        return spec_err(format!("target {target:?} is not an absolute path"));
    }
    let parts: Vec<&str> = target.split('/').skip(1).collect();
    if parts.iter().all(|p| p.is_empty()) {
        return spec_err("target / is the root; mount something below it");
    }
    // One trailing slash is fine; anything else odd is refused.
    let body = if parts.last() == Some(&"") { &parts[..parts.len() - 1] } else { &parts[..] };
    if body.iter().any(|p| p.is_empty() || *p == "." || *p == "..") {
        return spec_err(format!("target {target:?} has an empty, . or .. component"));
    }
    if target.contains('\0') {
        return spec_err(format!("target {target:?} holds a NUL byte"));
    }
    Ok(())
}

/// `/a/b/` -> `/a/b`.
fn normalized(path: &str) -> &str {
    if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    }
}

/// `inner` is `outer` or below it, component-wise.
pub fn is_under(inner: &str, outer: &str) -> bool {
    let (inner, outer) = (normalized(inner), normalized(outer));
    outer == "/" || inner == outer || inner.strip_prefix(outer).is_some_and(|rest| rest.starts_with('/'))
}

fn parse_octal_mode(value: &str) -> Result<u32, SpecError> {
    u32::from_str_radix(value.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| SpecError(format!("mode {value:?} is not an octal mode")))
}

fn parse_id(what: &str, value: &str) -> Result<u32, SpecError> {
    value.parse().map_err(|_| SpecError(format!("{what} {value:?} is not a number")))
}

fn parse_wait(value: &str) -> Result<Duration, SpecError> {
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && (0.0..=3600.0).contains(s))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| SpecError(format!("wait {value:?} is not a number of seconds from 0 to 3600")))
}

/// The type a Kata storage driver implies, when `fstype` leaves it open.
fn driver_fstype(driver: &str) -> Result<Option<&'static str>, SpecError> {
    Ok(match driver {
        "" | "blk" | "mmioblk" | "scsi" | "nvdimm" | "local" => None,
        "virtio-fs" | "virtiofs" => Some("virtiofs"),
        "9p" => Some("9p"),
        "nfs" => Some("nfs"),
        "ephemeral" | "tmpfs" => Some("tmpfs"),
        "bind" => Some("bind"),
        other => {
            return spec_err(format!(
                "storage driver {other:?} is not one this agent has (blk, mmioblk, scsi, nvdimm, virtio-fs, 9p, nfs, ephemeral, tmpfs, bind)"
            ))
        }
    })
}

impl MountSpec {
    /// Reads an fstab-style line: `SOURCE TARGET [TYPE [OPTIONS]]`, fields separated by
    /// whitespace (`\040` for a space inside one, as in fstab). Options are
    /// comma-separated; `ro`, `rw`, `defaults`, `nofail`, `x-osb.wait=SECONDS`,
    /// `x-osb.uid=N`, `x-osb.gid=N` and `x-osb.mode=OCTAL` are ours, other `x-*` options
    /// are ignored (as mount(8) does), everything else goes to the mount.
    pub fn parse_line(line: &str) -> Result<MountSpec, SpecError> {
        let fields: Vec<String> = line.split_whitespace().map(unescape_field).collect();
        if !(2..=4).contains(&fields.len()) {
            return spec_err(format!("{line:?}: expected SOURCE TARGET [TYPE [OPTIONS]]"));
        }
        let mut spec = MountSpec { source: fields[0].clone(), target: fields[1].clone(), ..MountSpec::default() };
        spec.fstype = fields.get(2).cloned();
        spec.normalize();
        if let Some(opts) = fields.get(3) {
            spec.add_options(opts.split(',').filter(|o| !o.is_empty()))?;
        }
        spec.validate()?;
        Ok(spec)
    }

    /// One spelling for each setting: no source is `none` (as in fstab), no type or
    /// `auto` is `None`.
    pub fn normalize(&mut self) {
        if self.source.is_empty() {
            self.source = "none".into();
        }
        if self.fstype.as_deref().is_some_and(|t| t.is_empty() || t == "auto") {
            self.fstype = None;
        }
        if self.target.len() > 1 {
            self.target = self.target.trim_end_matches('/').to_owned();
        }
    }

    /// Takes mount options, consuming ours (see [`MountSpec::parse_line`]).
    pub fn add_options<'a>(&mut self, options: impl IntoIterator<Item = &'a str>) -> Result<(), SpecError> {
        for opt in options {
            let (key, value) = opt.split_once('=').map_or((opt, None), |(k, v)| (k, Some(v)));
            match (key, value) {
                ("ro", None) => self.read_only = true,
                ("rw", None) => self.read_only = false,
                ("defaults" | "auto" | "_netdev", None) => {}
                ("nofail", None) => self.nofail = true,
                ("noauto", None) => return spec_err("noauto: a listed mount is always mounted; leave it out of the list instead"),
                ("x-osb.wait", Some(v)) => self.wait = Some(parse_wait(v)?),
                ("x-osb.uid", Some(v)) => self.uid = Some(parse_id("uid", v)?),
                ("x-osb.gid", Some(v)) => self.gid = Some(parse_id("gid", v)?),
                ("x-osb.mode", Some(v)) => self.mode = Some(parse_octal_mode(v)?),
                (k, _) if k.starts_with("x-osb.") => return spec_err(format!("unknown option {opt:?} (x-osb.wait, x-osb.uid, x-osb.gid, x-osb.mode)")),
                (k, _) if k.starts_with("x-") => {}
                _ => self.options.push(opt.to_owned()),
            }
        }
        Ok(())
    }

    /// Sets the mode from an octal string (`"0755"`).
    pub fn set_mode(&mut self, value: &str) -> Result<(), SpecError> {
        self.mode = Some(parse_octal_mode(value)?);
        Ok(())
    }

    /// The options [`MountSpec::add_options`] reads back to this spec's settings: `ro` or
    /// `rw`, the filesystem's options, then ours.
    pub fn option_words(&self) -> Vec<String> {
        let mut opts: Vec<String> = vec![if self.read_only { "ro".into() } else { "rw".into() }];
        opts.extend(self.options.iter().cloned());
        if self.nofail {
            opts.push("nofail".into());
        }
        if let Some(w) = self.wait {
            opts.push(format!("x-osb.wait={}", w.as_secs_f64()));
        }
        if let Some(u) = self.uid {
            opts.push(format!("x-osb.uid={u}"));
        }
        if let Some(g) = self.gid {
            opts.push(format!("x-osb.gid={g}"));
        }
        if let Some(m) = self.mode {
            opts.push(format!("x-osb.mode={m:04o}"));
        }
        opts
    }

    /// The fstab-style line [`MountSpec::parse_line`] reads back to this spec.
    pub fn to_line(&self) -> String {
        format!(
            "{} {} {} {}",
            escape_field(&self.source),
            escape_field(&self.target),
            escape_field(self.fstype.as_deref().unwrap_or("auto")),
            escape_field(&self.option_words().join(","))
        )
    }

    /// A Kata `Storage` message as a mount (the storage RPC's argument). `driver` may
    /// imply the type (`virtio-fs`, `9p`, `nfs`, `ephemeral`, `bind`; the block drivers
    /// leave it to `fstype` or the superblock); options may be given one per entry or
    /// comma-joined (Kata does both). `nofail` is refused: a call fails or succeeds.
    pub fn from_storage(s: &Storage) -> Result<MountSpec, SpecError> {
        let implied = driver_fstype(&s.driver)?;
        let fstype = match (s.fstype.as_str(), implied) {
            ("" | "auto", Some(t)) => Some(t.to_owned()),
            ("", None) => None,
            (given, _) => Some(given.to_owned()),
        };
        let mut spec = MountSpec { source: s.source.clone(), target: s.mount_point.clone(), fstype, ..MountSpec::default() };
        spec.normalize();
        spec.add_options(s.options.iter().flat_map(|o| o.split(',')).filter(|o| !o.is_empty()))?;
        if spec.nofail {
            return spec_err("nofail means nothing to MountStorage: the call fails or succeeds");
        }
        spec.validate()?;
        Ok(spec)
    }

    /// This mount as a Kata `Storage` message ([`MountSpec::from_storage`] reads it back
    /// unless it is `nofail`): no driver (the type says it all), the options as
    /// [`MountSpec::option_words`].
    pub fn to_storage(&self) -> Storage {
        Storage {
            source: self.source.clone(),
            fstype: self.fstype.clone().unwrap_or_default(),
            options: self.option_words(),
            mount_point: self.target.clone(),
            ..Default::default()
        }
    }

    /// Checks the target and that the source fits the type.
    pub fn validate(&self) -> Result<(), SpecError> {
        check_target(&self.target)?;
        self.kind().map(|_| ())
    }

    /// What this spec mounts.
    pub fn kind(&self) -> Result<Kind, SpecError> {
        let source = self.source.as_str();
        let fstype = self.fstype.as_deref().unwrap_or("auto");
        let bind = fstype == "bind" || self.options.iter().any(|o| o == "bind" || o == "rbind");
        if bind {
            if !source.starts_with('/') {
                return spec_err(format!("bind mount source {source:?} is not an absolute path"));
            }
            return Ok(Kind::Bind { from: source.to_owned() });
        }
        let tag = |make: fn(String) -> Kind| {
            if source.is_empty() || source == "none" {
                spec_err(format!("a {fstype} mount needs a tag as its source"))
            } else {
                Ok(make(source.to_owned()))
            }
        };
        match fstype {
            "virtiofs" => tag(|tag| Kind::VirtioFs { tag }),
            "9p" => tag(|tag| Kind::NineP { tag }),
            "nfs" | "nfs4" => {
                let (server, export) = split_nfs_source(source)?;
                let v4 = fstype == "nfs4" || self.options.iter().any(|o| o.starts_with("vers=4") || o.starts_with("nfsvers=4"));
                Ok(Kind::Nfs { server, export, v4 })
            }
            "tmpfs" => Ok(Kind::Tmpfs),
            _ => match device_ref(source) {
                Some(dev) => Ok(Kind::Block(dev?)),
                None if fstype == "auto" => spec_err(format!("source {source:?} is no block device (/dev/..., LABEL=, UUID=, SERIAL=); name the type")),
                None => Ok(Kind::Other),
            },
        }
    }
}

/// `LABEL=`, `UUID=`, `SERIAL=` or a `/dev/` path; `None` for anything else.
fn device_ref(source: &str) -> Option<Result<DeviceRef, SpecError>> {
    let named = |value: &str, what: &str, make: fn(String) -> DeviceRef| {
        if value.is_empty() {
            Err(SpecError(format!("{source:?} names no {what}")))
        } else {
            Ok(make(value.to_owned()))
        }
    };
    if let Some(v) = source.strip_prefix("LABEL=") {
        Some(named(v, "label", DeviceRef::Label))
    } else if let Some(v) = source.strip_prefix("UUID=") {
        Some(named(v, "UUID", DeviceRef::Uuid))
    } else if let Some(v) = source.strip_prefix("SERIAL=") {
        Some(named(v, "serial", DeviceRef::Serial))
    } else if source.starts_with("/dev/") {
        Some(if source.contains("/../") || source.ends_with("/..") {
            Err(SpecError(format!("device {source:?} has a .. component")))
        } else {
            Ok(DeviceRef::Path(source.to_owned()))
        })
    } else {
        None
    }
}

/// `host:/export`, `10.0.2.2:/srv`, `[fd00::1]:/srv` -> (server, export).
fn split_nfs_source(source: &str) -> Result<(String, String), SpecError> {
    let bad = || SpecError(format!("NFS source {source:?} is not SERVER:/EXPORT"));
    let (server, export) = if let Some(rest) = source.strip_prefix('[') {
        let (addr, export) = rest.split_once("]:").ok_or_else(bad)?;
        (addr, export)
    } else {
        source.split_once(':').ok_or_else(bad)?
    };
    if server.is_empty() || !export.starts_with('/') {
        return Err(bad());
    }
    Ok((server.to_owned(), export.to_owned()))
}

/// fstab's and /proc/mounts' `\NNN` octal escapes decoded (one byte each: the first digit
/// 0-3); anything else is kept as it is.
pub fn unescape_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() && (b'0'..=b'3').contains(&bytes[i + 1]) && bytes[i + 2..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            out.push((bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// fstab's escaping: a backslash and every byte of a whitespace character (what
/// `split_whitespace` would split on) as `\NNN`.
fn escape_field(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    for c in field.chars() {
        if c == '\\' || c.is_whitespace() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\{b:03o}"));
            }
        } else {
            out.push(c);
        }
    }
    if out.is_empty() {
        out.push_str("none");
    }
    out
}

/// Puts mounts in an order that respects their dependencies: a mount whose target lies
/// inside another's target, or whose bind source does, comes after it; otherwise the
/// given order is kept. Two mounts on one target are refused.
pub fn order(specs: Vec<MountSpec>) -> Result<Vec<MountSpec>, SpecError> {
    for (i, a) in specs.iter().enumerate() {
        if let Some(b) = specs[i + 1..].iter().find(|b| normalized(&b.target) == normalized(&a.target)) {
            return spec_err(format!("two mounts on {}: {} and {}", normalized(&a.target), a.source, b.source));
        }
    }
    let needs = |b: &MountSpec, a: &MountSpec| -> bool {
        // b needs a mounted first.
        if is_under(&b.target, &a.target) {
            return true;
        }
        matches!(b.kind(), Ok(Kind::Bind { from }) if is_under(&from, &a.target))
    };
    let mut left: Vec<Option<MountSpec>> = specs.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(left.len());
    while out.len() < left.len() {
        let next = (0..left.len()).find(|&i| {
            let Some(b) = &left[i] else { return false };
            left.iter().enumerate().all(|(j, a)| j == i || a.as_ref().is_none_or(|a| !needs(b, a)))
        });
        match next {
            Some(i) => out.push(left[i].take().expect("not yet placed")),
            None => {
                let stuck: Vec<&str> = left.iter().flatten().map(|s| s.target.as_str()).collect();
                return spec_err(format!("the mounts on {} depend on each other (a bind source inside a mount that is inside the bind)", stuck.join(", ")));
            }
        }
    }
    Ok(out)
}

/// A filesystem's type, UUID and label as its superblock gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FsId {
    /// The type to mount it with (`ext4` for ext2/3/4: the ext4 driver mounts all three).
    pub fstype: &'static str,
    /// Lowercase 8-4-4-4-12 hex; FAT's volume id as `ABCD-EF01`; "" when none.
    pub uuid: String,
    pub label: String,
}

fn uuid_text(bytes: &[u8]) -> String {
    if bytes.iter().all(|b| *b == 0) {
        return String::new();
    }
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

fn label_text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim_end().to_owned()
}

fn at(head: &[u8], offset: usize, len: usize) -> Option<&[u8]> {
    head.get(offset..offset + len)
}

/// Reads the superblock at the start of a device (`head`: its first [`PROBE_BYTES`],
/// or fewer for a small device). Knows ext2/3/4, erofs, XFS, btrfs and FAT.
pub fn probe(head: &[u8]) -> Option<FsId> {
    // ext2/3/4: superblock at 1024, magic 0xEF53 at 0x38, UUID at 0x68, label at 0x78.
    if at(head, 1024 + 0x38, 2) == Some(&[0x53, 0xEF]) {
        return Some(FsId { fstype: "ext4", uuid: uuid_text(at(head, 1024 + 0x68, 16)?), label: label_text(at(head, 1024 + 0x78, 16)?) });
    }
    // erofs: superblock at 1024, magic 0xE0F5E1E2, UUID at 48, volume name at 64.
    if at(head, 1024, 4) == Some(&0xE0F5_E1E2u32.to_le_bytes()) {
        return Some(FsId { fstype: "erofs", uuid: uuid_text(at(head, 1024 + 48, 16)?), label: label_text(at(head, 1024 + 64, 16)?) });
    }
    // XFS: "XFSB" at 0, UUID at 32, label (12 bytes) at 108.
    if at(head, 0, 4) == Some(b"XFSB") {
        return Some(FsId { fstype: "xfs", uuid: uuid_text(at(head, 32, 16)?), label: label_text(at(head, 108, 12)?) });
    }
    // btrfs: superblock at 64 KiB, magic "_BHRfS_M" at 0x40, fsid at 0x20, label at 0x12b.
    if at(head, 0x10000 + 0x40, 8) == Some(b"_BHRfS_M") {
        return Some(FsId { fstype: "btrfs", uuid: uuid_text(at(head, 0x10000 + 0x20, 16)?), label: label_text(at(head, 0x10000 + 0x12b, 256)?) });
    }
    // FAT: boot sector signature, the type string at 0x52 (FAT32) or 0x36 (FAT12/16),
    // the volume id and label just before it.
    if at(head, 510, 2) == Some(&[0x55, 0xAA]) {
        let fat = |type_at: usize, id_at: usize, label_at: usize| -> Option<FsId> {
            if !at(head, type_at, 5)?.starts_with(b"FAT") {
                return None;
            }
            let id = u32::from_le_bytes(at(head, id_at, 4)?.try_into().ok()?);
            let label = label_text(at(head, label_at, 11)?);
            let label = if label == "NO NAME" { String::new() } else { label };
            Some(FsId { fstype: "vfat", uuid: format!("{:04X}-{:04X}", id >> 16, id & 0xffff), label })
        };
        return fat(0x52, 0x43, 0x47).or_else(|| fat(0x36, 0x27, 0x2B));
    }
    None
}

/// The system calls a mount needs. [`Linux`] makes them.
pub trait Ops {
    fn exists(&mut self, path: &str) -> bool;
    /// A small text file (sysfs, procfs).
    fn read_text(&mut self, path: &str) -> io::Result<String>;
    /// Up to `len` bytes from the start of a file or device.
    fn read_head(&mut self, path: &str, len: usize) -> io::Result<Vec<u8>>;
    /// Names in a directory, sorted.
    fn list_dir(&mut self, path: &str) -> io::Result<Vec<String>>;
    /// Makes `path` and its missing parents (0755) a directory; with `follow` false no
    /// component may be a symbolic link. Returns a handle on the directory.
    fn make_dir(&mut self, path: &str, follow: bool) -> io::Result<Target>;
    fn mount(&mut self, source: &str, target: &Target, fstype: &str, flags: u64, data: &str) -> io::Result<()>;
    /// Sets owner (None: unchanged) and mode (None: unchanged) of `target`'s directory
    /// as it is now (after a mount: the mounted root).
    fn set_owner(&mut self, target: &Target, uid: Option<u32>, gid: Option<u32>, mode: Option<u32>) -> io::Result<()>;
    /// Unmounts the mount on `target`; with `follow` false no component of the path may
    /// be a symbolic link (guest processes may have made one since the mount).
    fn umount(&mut self, target: &str, detach: bool, follow: bool) -> io::Result<()>;
    /// MS_NOSUID, MS_NODEV, MS_NOEXEC and MS_RDONLY of the mount holding `path`
    /// (statvfs; 0 when it cannot be read).
    fn source_flags(&mut self, path: &str) -> u64;
    fn sleep(&mut self, d: Duration);
}

/// A mount point, as the path asked for and (on Linux) an `O_PATH` descriptor on it, so
/// the mount lands on the directory that was checked even if a name on the way changes.
#[derive(Debug)]
pub struct Target {
    pub path: String,
    pub fd: Option<OwnedFd>,
    /// Whether `path` was walked following symbolic links.
    pub follow: bool,
}

impl Target {
    /// What mount(2) and chown are given: the descriptor's `/proc/self/fd` name.
    fn os_path(&self) -> String {
        match &self.fd {
            Some(fd) => format!("/proc/self/fd/{}", fd.as_raw_fd()),
            None => self.path.clone(),
        }
    }
}

/// Why a mount failed: the spec's source and target and the cause.
#[derive(Debug)]
pub struct MountError {
    pub source: String,
    pub target: String,
    /// The device never appeared within the wait.
    pub timed_out: bool,
    pub cause: String,
    pub nofail: bool,
}

impl fmt::Display for MountError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "mount {} on {}: {}", self.source, self.target, self.cause)
    }
}

impl std::error::Error for MountError {}

/// What a finished mount used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mounted {
    /// The device or source handed to mount(2).
    pub device: String,
    pub fstype: String,
    pub data: String,
}

/// Mount flags from option words, the rest as the data string.
pub fn split_options(options: &[String]) -> (u64, String) {
    let mut flags = 0u64;
    let mut data = Vec::new();
    for opt in options {
        let (set, clear): (u64, u64) = match opt.as_str() {
            "nosuid" => (libc::MS_NOSUID, 0),
            "suid" => (0, libc::MS_NOSUID),
            "nodev" => (libc::MS_NODEV, 0),
            "dev" => (0, libc::MS_NODEV),
            "noexec" => (libc::MS_NOEXEC, 0),
            "exec" => (0, libc::MS_NOEXEC),
            "sync" => (libc::MS_SYNCHRONOUS, 0),
            "async" => (0, libc::MS_SYNCHRONOUS),
            "dirsync" => (libc::MS_DIRSYNC, 0),
            "noatime" => (libc::MS_NOATIME, 0),
            "atime" => (0, libc::MS_NOATIME),
            "nodiratime" => (libc::MS_NODIRATIME, 0),
            "relatime" => (libc::MS_RELATIME, 0),
            "norelatime" => (0, libc::MS_RELATIME),
            "strictatime" => (libc::MS_STRICTATIME, 0),
            "lazytime" => (libc::MS_LAZYTIME, 0),
            "bind" => (libc::MS_BIND, 0),
            "rbind" => (libc::MS_BIND | libc::MS_REC, 0),
            _ => {
                data.push(opt.as_str());
                continue;
            }
        };
        flags = (flags | set) & !clear;
    }
    (flags, data.join(","))
}

fn join(parts: &[&str]) -> String {
    parts.iter().filter(|p| !p.is_empty()).copied().collect::<Vec<_>>().join(",")
}

fn has_option(data: &str, key: &str) -> bool {
    data.split(',').any(|o| o == key || o.split_once('=').is_some_and(|(k, _)| k == key))
}

/// Finds a block device: waits up to `wait` for it to appear. Returns its path.
pub fn find_device(ops: &mut dyn Ops, dev: &DeviceRef, wait: Duration) -> Result<String, String> {
    let mut waited = Duration::ZERO;
    loop {
        match lookup(ops, dev)? {
            Some(path) => return Ok(path),
            None if waited >= wait => {
                let hint = match dev {
                    DeviceRef::Path(_) => "check the VM's disks",
                    DeviceRef::Label(_) | DeviceRef::Uuid(_) => "no block device's filesystem has it (ext2/3/4, erofs, XFS, btrfs and FAT are read)",
                    DeviceRef::Serial(_) => "no disk has it (virtio-blk serial=, SCSI serial=)",
                };
                return Err(format!("device {dev} not there after {:.1} s; {hint}", waited.as_secs_f64()));
            }
            None => {
                ops.sleep(POLL);
                waited += POLL;
            }
        }
    }
}

/// One look for the device; an error when two devices match.
fn lookup(ops: &mut dyn Ops, dev: &DeviceRef) -> Result<Option<String>, String> {
    if let DeviceRef::Path(p) = dev {
        return Ok(ops.exists(p).then(|| p.clone()));
    }
    let names = ops.list_dir("/sys/class/block").unwrap_or_default();
    let mut found: Vec<String> = Vec::new();
    for name in names {
        let node = format!("/dev/{name}");
        let hit = match dev {
            DeviceRef::Serial(serial) => {
                // Whole disks only: a partition has no serial of its own.
                if ops.exists(&format!("/sys/class/block/{name}/partition")) {
                    continue;
                }
                disk_serial(ops, &name).is_some_and(|s| s == *serial)
            }
            DeviceRef::Label(_) | DeviceRef::Uuid(_) => {
                if !ops.exists(&node) || name.starts_with("loop") || name.starts_with("ram") {
                    continue;
                }
                // A device held by another (a dm-verity or dm-crypt target's data
                // device) is reached through the holder, which carries the same
                // superblock.
                if ops.list_dir(&format!("/sys/class/block/{name}/holders")).is_ok_and(|h| !h.is_empty()) {
                    continue;
                }
                let Ok(head) = ops.read_head(&node, PROBE_BYTES) else { continue };
                match (probe(&head), dev) {
                    (Some(id), DeviceRef::Label(l)) => !id.label.is_empty() && id.label == *l,
                    (Some(id), DeviceRef::Uuid(u)) => !id.uuid.is_empty() && id.uuid.eq_ignore_ascii_case(u),
                    _ => false,
                }
            }
            DeviceRef::Path(_) => unreachable!("handled above"),
        };
        if hit && ops.exists(&node) {
            found.push(node);
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        _ => Err(format!("{dev} matches {}: refusing to guess; name the device", found.join(" and "))),
    }
}

/// A whole disk's serial: virtio-blk's `serial` attribute, or a SCSI disk's VPD page
/// 0x80 (unit serial number: a 4-byte header, then the serial, space-padded).
fn disk_serial(ops: &mut dyn Ops, name: &str) -> Option<String> {
    if let Ok(s) = ops.read_text(&format!("/sys/class/block/{name}/serial")) {
        let s = s.trim();
        if !s.is_empty() {
            return Some(s.to_owned());
        }
    }
    let page = ops.read_head(&format!("/sys/class/block/{name}/device/vpd_pg80"), 256).ok()?;
    let len = usize::from(*page.get(3)?);
    let serial = String::from_utf8_lossy(page.get(4..4 + len.min(page.len().saturating_sub(4)))?).trim_matches(|c: char| c == ' ' || c == '\0').to_owned();
    (!serial.is_empty()).then_some(serial)
}

/// Mounts one spec. `follow`: the target may pass through symbolic links (the image's
/// own, at boot); the agent's mounts after boot refuse them, since guest processes may
/// have made them. `hosts`: extra name -> address pairs for an NFS server given by name
/// (the run config's `/etc/hosts` entries; the kernel resolves no names).
pub fn mount(ops: &mut dyn Ops, spec: &MountSpec, follow: bool, hosts: &[(String, String)]) -> Result<Mounted, MountError> {
    let fail = |cause: String| MountError { source: spec.source.clone(), target: spec.target.clone(), timed_out: false, cause, nofail: spec.nofail };
    let kind = spec.kind().map_err(|e| fail(e.0))?;
    check_target(&spec.target).map_err(|e| fail(e.0))?;
    let (mut flags, data) = split_options(&spec.options);
    if spec.read_only {
        flags |= libc::MS_RDONLY;
    }
    let wait = spec.wait.unwrap_or(DEFAULT_DEVICE_WAIT);
    let given = spec.fstype.clone().filter(|t| t != "auto");
    let (device, fstype, data): (String, String, String) = match &kind {
        Kind::Block(dev) => {
            let path = find_device(ops, dev, wait).map_err(|cause| MountError { timed_out: !cause.contains(" matches "), ..fail(cause) })?;
            let fstype = match &given {
                Some(t) => t.clone(),
                None => match ops.read_head(&path, PROBE_BYTES).ok().and_then(|h| probe(&h)) {
                    Some(id) => id.fstype.to_owned(),
                    None => return Err(fail(format!("{path}: no filesystem this guest recognises (ext2/3/4, erofs, XFS, btrfs, FAT); name the type"))),
                },
            };
            (path, fstype, data)
        }
        Kind::VirtioFs { tag } => (tag.clone(), "virtiofs".into(), data),
        Kind::NineP { tag } => {
            let defaults = [("trans", "trans=virtio"), ("version", "version=9p2000.L")];
            let extra: Vec<&str> = defaults.iter().filter(|(k, _)| !has_option(&data, k)).map(|(_, v)| *v).collect();
            (tag.clone(), "9p".into(), join(&[&extra.join(","), &data]))
        }
        Kind::Nfs { server, export, v4 } => {
            let addr = nfs_address(server, hosts).map_err(fail)?;
            let mut extra = Vec::new();
            if !has_option(&data, "addr") {
                extra.push(format!("addr={addr}"));
            }
            if *v4 {
                if !has_option(&data, "vers") && !has_option(&data, "nfsvers") {
                    extra.push("vers=4.1".into());
                }
            } else {
                if !has_option(&data, "vers") && !has_option(&data, "nfsvers") {
                    extra.push("vers=3".into());
                }
                // No rpc.statd in the guest: NLM locking cannot work.
                if !has_option(&data, "lock") && !has_option(&data, "nolock") {
                    extra.push("nolock".into());
                }
            }
            let source = if server.contains(':') { format!("[{server}]:{export}") } else { format!("{server}:{export}") };
            let data = join(&[&extra.join(","), &data]);
            (source, if *v4 { "nfs4".into() } else { "nfs".into() }, data)
        }
        Kind::Tmpfs => {
            let mut extra = Vec::new();
            if let (Some(m), false) = (spec.mode, has_option(&data, "mode")) {
                extra.push(format!("mode={m:o}"));
            }
            if let (Some(u), false) = (spec.uid, has_option(&data, "uid")) {
                extra.push(format!("uid={u}"));
            }
            if let (Some(g), false) = (spec.gid, has_option(&data, "gid")) {
                extra.push(format!("gid={g}"));
            }
            let source = if spec.source.is_empty() { "tmpfs".into() } else { spec.source.clone() };
            (source, "tmpfs".into(), join(&[&extra.join(","), &data]))
        }
        Kind::Bind { from } => {
            if !ops.exists(from) {
                return Err(fail(format!("bind source {from} does not exist")));
            }
            // `type bind` as much as the `bind` option.
            flags |= libc::MS_BIND;
            (from.clone(), String::new(), data)
        }
        Kind::Other => (spec.source.clone(), given.clone().unwrap_or_default(), data),
    };
    let target = ops.make_dir(&spec.target, follow).map_err(|e| fail(format!("create mount point: {e}")))?;
    let mut result = ops.mount(&device, &target, &fstype, flags, &data);
    // A read-only device: as mount(8), try again read-only.
    if let Err(e) = &result {
        if matches!(kind, Kind::Block(_)) && flags & libc::MS_RDONLY == 0 && matches!(e.raw_os_error(), Some(libc::EROFS | libc::EACCES)) {
            result = ops.mount(&device, &target, &fstype, flags | libc::MS_RDONLY, &data);
        }
    }
    if let Err(e) = result {
        return Err(fail(explain_mount_error(&kind, &device, &fstype, &data, &e)));
    }
    // Owner and mode before a bind's read-only remount (for a bind they are the source
    // directory's own).
    if !matches!(kind, Kind::Tmpfs) && (spec.uid.is_some() || spec.gid.is_some() || spec.mode.is_some()) {
        if let Err(e) = ops.set_owner(&target, spec.uid, spec.gid, spec.mode) {
            let _ = ops.umount(&spec.target, true, follow);
            let hint = if e.raw_os_error() == Some(libc::EROFS) { " (the mount is read-only: leave uid, gid and mode out)" } else { "" };
            return Err(fail(format!("set owner/mode of the mounted root: {e}{hint}")));
        }
    }
    // A bind mount takes its flags (ro, nosuid, nodev, noexec, atime) only from a
    // remount; the source mount's own nosuid/nodev/noexec are kept (a bind of
    // something under a nosuid /run must not become suid).
    let per_mount = flags & !(libc::MS_BIND | libc::MS_REC);
    if let (Kind::Bind { from }, true) = (&kind, per_mount != 0) {
        let kept = ops.source_flags(from) & (libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC);
        let remount = libc::MS_REMOUNT | libc::MS_BIND | per_mount | kept;
        // The handle names the directory beneath the new mount: walk to its root again.
        let top = ops.make_dir(&spec.target, follow);
        if let Err(e) = top.and_then(|top| ops.mount("", &top, "", remount, "")) {
            let _ = ops.umount(&spec.target, true, follow);
            return Err(fail(format!("apply the bind mount's options: {e}")));
        }
    }
    Ok(Mounted { device, fstype, data })
}

/// The NFS server's address: an address literal, or a name from `hosts`.
fn nfs_address(server: &str, hosts: &[(String, String)]) -> Result<String, String> {
    if server.parse::<std::net::IpAddr>().is_ok() {
        return Ok(server.to_owned());
    }
    hosts
        .iter()
        .find(|(name, _)| name == server)
        .map(|(_, addr)| addr.clone())
        .ok_or_else(|| format!("NFS server {server:?} is no address and not in the run config's hosts: the kernel resolves no names"))
}

/// A failed mount(2) in words a user can act on.
fn explain_mount_error(kind: &Kind, device: &str, fstype: &str, data: &str, e: &io::Error) -> String {
    let errno = e.raw_os_error();
    let hint = match kind {
        Kind::VirtioFs { tag } if has_option(data, "dax") && errno == Some(libc::EINVAL) => format!(
            "; the virtio-fs device {tag} refused DAX: the VMM gives it no DAX window (upstream QEMU has none; Cloud Hypervisor and Kata's QEMU do); mount it without dax"
        ),
        Kind::VirtioFs { tag } | Kind::NineP { tag } if errno == Some(libc::ENOENT) => format!("; no {fstype} device has the tag {tag:?}: check the VM's devices"),
        Kind::Nfs { .. } if matches!(errno, Some(libc::ETIMEDOUT | libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EIO)) => {
            "; the NFS server did not answer: check the guest's network and the server".to_owned()
        }
        Kind::Block(_) if errno == Some(libc::EINVAL) => format!("; {device} does not hold a {fstype} filesystem, or an option is wrong"),
        _ if errno == Some(libc::ENODEV) => format!("; this kernel has no {fstype} filesystem"),
        _ => String::new(),
    };
    let what = if fstype.is_empty() { "bind".to_owned() } else { fstype.to_owned() };
    format!("{what}{}: {e}{hint}", if data.is_empty() { String::new() } else { format!(" ({data})") })
}

/// Unmounts `target` (with `detach`, lazily: MNT_DETACH), not through symbolic links.
pub fn unmount(ops: &mut dyn Ops, target: &str, detach: bool) -> io::Result<()> {
    ops.umount(target, detach, false)
}

/// The real system calls.
pub struct Linux;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{s:?} holds a NUL byte")))
}

impl Ops for Linux {
    fn exists(&mut self, path: &str) -> bool {
        std::path::Path::new(path).exists()
    }

    fn read_text(&mut self, path: &str) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn read_head(&mut self, path: &str, len: usize) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let mut buf = Vec::with_capacity(len);
        std::fs::File::open(path)?.take(len as u64).read_to_end(&mut buf)?;
        Ok(buf)
    }

    fn list_dir(&mut self, path: &str) -> io::Result<Vec<String>> {
        let mut names: Vec<String> = std::fs::read_dir(path)?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        Ok(names)
    }

    fn make_dir(&mut self, path: &str, follow: bool) -> io::Result<Target> {
        use crate::dirwalk::{open_dirs, WalkError};
        let dir = open_dirs(std::path::Path::new(path), 0o755, follow).map_err(|e| match e {
            WalkError::Symlink(w) => {
                io::Error::new(io::ErrorKind::InvalidInput, format!("{} is a symbolic link; mount points must not pass through one", w.display()))
            }
            WalkError::NotDir(w) => io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a directory", w.display())),
            WalkError::Io { op, walked, error } => io::Error::new(error.kind(), format!("{op} {}: {error}", walked.display())),
        })?;
        Ok(Target { path: path.to_owned(), fd: Some(dir), follow })
    }

    fn mount(&mut self, source: &str, target: &Target, fstype: &str, flags: u64, data: &str) -> io::Result<()> {
        let (source, target_path, fstype, data) = (cstr(source)?, cstr(&target.os_path())?, cstr(fstype)?, cstr(data)?);
        let ptr = |s: &CString| if s.as_bytes().is_empty() { std::ptr::null() } else { s.as_ptr() };
        // SAFETY: every pointer is a NUL-terminated string or null, as mount(2) allows.
        let rc = unsafe { libc::mount(ptr(&source), target_path.as_ptr(), ptr(&fstype), flags as libc::c_ulong, ptr(&data).cast()) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn set_owner(&mut self, target: &Target, uid: Option<u32>, gid: Option<u32>, mode: Option<u32>) -> io::Result<()> {
        // The descriptor was opened before the mount and names the directory beneath
        // it: walk again (as carefully) to reach the mounted root.
        let top = self.make_dir(&target.path, target.follow)?;
        let root = cstr(&top.os_path())?;
        if uid.is_some() || gid.is_some() {
            let id = |v: Option<u32>| v.unwrap_or(u32::MAX);
            // SAFETY: a NUL-terminated path; -1 (u32::MAX) leaves an id unchanged.
            if unsafe { libc::chown(root.as_ptr(), id(uid), id(gid)) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(mode) = mode {
            // SAFETY: a NUL-terminated path.
            if unsafe { libc::chmod(root.as_ptr(), mode) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }

    fn umount(&mut self, target: &str, detach: bool, follow: bool) -> io::Result<()> {
        // Without following links: the parent walked like a mount point, the last name
        // looked up from it with UMOUNT_NOFOLLOW. (A descriptor on the mounted root itself
        // would keep it busy.)
        let (parent, path, extra) = if follow {
            (None, target.to_owned(), 0)
        } else {
            let (dir, name) = target
                .rsplit_once('/')
                .filter(|(_, n)| !n.is_empty())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{target:?} is no mount point")))?;
            let dir = self.make_dir(if dir.is_empty() { "/" } else { dir }, false)?;
            let path = format!("{}/{name}", dir.os_path());
            (Some(dir), path, libc::UMOUNT_NOFOLLOW)
        };
        let path = cstr(&path)?;
        // SAFETY: a NUL-terminated path.
        let rc = unsafe { libc::umount2(path.as_ptr(), extra | if detach { libc::MNT_DETACH } else { 0 }) };
        drop(parent);
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn source_flags(&mut self, path: &str) -> u64 {
        let Ok(path) = cstr(path) else { return 0 };
        // SAFETY: an all-zero statvfs is a valid out-buffer.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: a NUL-terminated path and a valid out-pointer.
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return 0;
        }
        let f = st.f_flag;
        [(libc::ST_NOSUID, libc::MS_NOSUID), (libc::ST_NODEV, libc::MS_NODEV), (libc::ST_NOEXEC, libc::MS_NOEXEC), (libc::ST_RDONLY, libc::MS_RDONLY)]
            .iter()
            .filter(|(st_bit, _)| f & st_bit != 0)
            .fold(0, |acc, (_, ms)| acc | ms)
    }

    fn sleep(&mut self, d: Duration) {
        std::thread::sleep(d);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    fn storage(driver: &str, source: &str, fstype: &str, options: &[&str], mount_point: &str) -> Storage {
        Storage {
            driver: driver.into(),
            source: source.into(),
            fstype: fstype.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
            mount_point: mount_point.into(),
            ..Default::default()
        }
    }

    #[test]
    fn storages_from_kata_drivers() {
        let s = MountSpec::from_storage(&storage("virtio-fs", "shared", "", &["rw,dax=always"], "/mnt/s")).unwrap();
        assert_eq!((s.fstype.as_deref(), s.options.as_slice()), (Some("virtiofs"), &["dax=always".to_owned()][..]));
        let s = MountSpec::from_storage(&storage("blk", "LABEL=data", "", &["ro", "x-osb.wait=10"], "/data")).unwrap();
        assert_eq!((s.fstype, s.read_only, s.wait), (None, true, Some(Duration::from_secs(10))));
        let s = MountSpec::from_storage(&storage("ephemeral", "tmpfs", "tmpfs", &["size=1m"], "/e")).unwrap();
        assert_eq!(s.kind().unwrap(), Kind::Tmpfs);
        for (bad, message) in [
            (storage("vfio", "x", "", &[], "/a"), "storage driver \"vfio\""),
            (storage("blk", "/dev/vdb", "", &[], "rel"), "not an absolute path"),
            (storage("blk", "/dev/vdb", "", &["nofail"], "/a"), "nofail means nothing"),
            (storage("blk", "02/00", "", &[], "/a"), "no block device"),
        ] {
            let err = MountSpec::from_storage(&bad).unwrap_err();
            assert!(err.0.contains(message), "{bad:?}: {err}");
        }
    }

    #[test]
    fn storages_round_trip() {
        let spec = MountSpec::parse_line("LABEL=data /data ext4 ro,noatime,x-osb.wait=2.5,x-osb.uid=7,x-osb.gid=8,x-osb.mode=0750").unwrap();
        let storage = spec.to_storage();
        assert_eq!(storage.options, ["ro", "noatime", "x-osb.wait=2.5", "x-osb.uid=7", "x-osb.gid=8", "x-osb.mode=0750"]);
        assert_eq!(MountSpec::from_storage(&storage).unwrap(), spec);
        let tmpfs = MountSpec::parse_line("none /scratch tmpfs size=1m").unwrap();
        assert_eq!((tmpfs.to_storage().fstype.as_str(), MountSpec::from_storage(&tmpfs.to_storage()).unwrap()), ("tmpfs", tmpfs));
    }

    fn spec(line: &str) -> MountSpec {
        MountSpec::parse_line(line).unwrap_or_else(|e| panic!("{line}: {e}"))
    }

    #[test]
    fn parses_fstab_lines() {
        let s = spec("LABEL=data /data ext4 rw,noatime,nofail,x-osb.wait=2.5,x-osb.uid=1000,x-osb.gid=100,x-osb.mode=0750,x-systemd.ignored");
        assert_eq!(
            s,
            MountSpec {
                source: "LABEL=data".into(),
                target: "/data".into(),
                fstype: Some("ext4".into()),
                options: vec!["noatime".into()],
                wait: Some(Duration::from_millis(2500)),
                read_only: false,
                uid: Some(1000),
                gid: Some(100),
                mode: Some(0o750),
                nofail: true,
            }
        );
        assert_eq!(s.kind().unwrap(), Kind::Block(DeviceRef::Label("data".into())));
        assert_eq!(MountSpec::parse_line(&s.to_line()).unwrap(), s, "{}", s.to_line());

        let s = spec("LABEL=my\\040disk /mnt/a\\040b");
        assert_eq!(unescape_field("a\\777b\\0"), "a\\777b\\0", "not a byte: kept");
        assert_eq!((s.source.as_str(), s.target.as_str(), s.fstype.as_deref()), ("LABEL=my disk", "/mnt/a b", None));
        assert_eq!(MountSpec::parse_line(&s.to_line()).unwrap(), s, "{}", s.to_line());

        assert_eq!(spec("share /srv 9p ro").kind().unwrap(), Kind::NineP { tag: "share".into() });
        assert!(spec("share /srv 9p ro").read_only);
        assert_eq!(spec("myfs /srv virtiofs").kind().unwrap(), Kind::VirtioFs { tag: "myfs".into() });
        assert_eq!(spec("none /tmp/x tmpfs size=64m").kind().unwrap(), Kind::Tmpfs);
        assert_eq!(spec("/data/sub /srv/sub none bind").kind().unwrap(), Kind::Bind { from: "/data/sub".into() });
        assert_eq!(spec("/data /srv bind").kind().unwrap(), Kind::Bind { from: "/data".into() });
        assert_eq!(spec("10.0.2.2:/export /mnt/nfs nfs").kind().unwrap(), Kind::Nfs { server: "10.0.2.2".into(), export: "/export".into(), v4: false });
        assert_eq!(spec("[fd00::2]:/e /n nfs vers=4.2").kind().unwrap(), Kind::Nfs { server: "fd00::2".into(), export: "/e".into(), v4: true });
        assert_eq!(spec("files:/e /n nfs4").kind().unwrap(), Kind::Nfs { server: "files".into(), export: "/e".into(), v4: true });
        assert_eq!(spec("SERIAL=vol-1 /v").kind().unwrap(), Kind::Block(DeviceRef::Serial("vol-1".into())));
        assert_eq!(spec("UUID=0a0b /v xfs").kind().unwrap(), Kind::Block(DeviceRef::Uuid("0a0b".into())));
        assert_eq!(spec("proc /mnt/proc proc").kind().unwrap(), Kind::Other);
    }

    #[test]
    fn refuses_bad_specs() {
        for (line, message) in [
            ("/dev/vdb", "expected SOURCE TARGET"),
            ("/dev/vdb data", "not an absolute path"),
            ("/dev/vdb /", "is the root"),
            ("/dev/vdb /a/../etc", ".. component"),
            ("/dev/vdb /a//b", "empty"),
            ("/dev/../etc/x /a", ".. component"),
            ("LABEL= /a", "names no label"),
            ("data /a", "no block device"),
            ("server/export /a nfs", "not SERVER:/EXPORT"),
            ("server:export /a nfs", "not SERVER:/EXPORT"),
            ("relative /a none bind", "not an absolute path"),
            (" /a virtiofs", "target \"virtiofs\" is not an absolute path"),
            ("/dev/vdb /a ext4 x-osb.wait=forever", "not a number of seconds"),
            ("/dev/vdb /a ext4 x-osb.mode=999", "not an octal mode"),
            ("/dev/vdb /a ext4 x-osb.colour=red", "unknown option"),
            ("/dev/vdb /a ext4 noauto", "noauto"),
            ("/dev/vdb /a ext4 rw extra", "expected SOURCE"),
        ] {
            let err = MountSpec::parse_line(line).unwrap_err().to_string();
            assert!(err.contains(message), "{line:?}: {err}");
        }
    }

    #[test]
    fn orders_by_dependency() {
        let targets = |specs: Vec<MountSpec>| order(specs).unwrap().into_iter().map(|s| s.target).collect::<Vec<_>>();
        let list = vec![
            spec("/data/www /srv/www none bind"),
            spec("/dev/vdc /data/logs ext4"),
            spec("LABEL=d /data"),
            spec("none /srv tmpfs"),
            spec("none /data2 tmpfs"),
        ];
        assert_eq!(targets(list), ["/data", "/data/logs", "/srv", "/srv/www", "/data2"]);
        // Independent mounts keep their order.
        assert_eq!(targets(vec![spec("none /b tmpfs"), spec("none /a tmpfs")]), ["/b", "/a"]);
        let err = order(vec![spec("none /a tmpfs"), spec("/dev/vdb /a/ ext4")]).unwrap_err().to_string();
        assert_eq!(err, "two mounts on /a: none and /dev/vdb");
        // A bind of a directory inside its own target's child: a cycle.
        let err = order(vec![spec("/a/b/c /a none bind"), spec("none /a/b tmpfs")]).unwrap_err().to_string();
        assert!(err.contains("depend on each other"), "{err}");
        assert!(is_under("/a/b", "/a") && is_under("/a", "/a/") && !is_under("/ab", "/a") && is_under("/x", "/"));
    }

    fn ext4_head(label: &str, uuid: [u8; 16]) -> Vec<u8> {
        let mut head = vec![0u8; 4096];
        head[1024 + 0x38..1024 + 0x3a].copy_from_slice(&[0x53, 0xEF]);
        head[1024 + 0x68..1024 + 0x78].copy_from_slice(&uuid);
        head[1024 + 0x78..1024 + 0x78 + label.len()].copy_from_slice(label.as_bytes());
        head
    }

    #[test]
    fn probes_superblocks() {
        let uuid = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef];
        assert_eq!(probe(&ext4_head("data", uuid)), Some(FsId { fstype: "ext4", uuid: "12345678-9abc-def0-0123-456789abcdef".into(), label: "data".into() }));

        let mut erofs = vec![0u8; 2048];
        erofs[1024..1028].copy_from_slice(&0xE0F5_E1E2u32.to_le_bytes());
        erofs[1024 + 64..1024 + 68].copy_from_slice(b"ro-1");
        assert_eq!(probe(&erofs), Some(FsId { fstype: "erofs", uuid: String::new(), label: "ro-1".into() }));

        let mut xfs = vec![0u8; 512];
        xfs[0..4].copy_from_slice(b"XFSB");
        xfs[32..48].copy_from_slice(&uuid);
        xfs[108..112].copy_from_slice(b"logs");
        assert_eq!(probe(&xfs).unwrap().label, "logs");

        let mut btrfs = vec![0u8; PROBE_BYTES];
        btrfs[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
        btrfs[0x1012b..0x1012e].copy_from_slice(b"big");
        assert_eq!(probe(&btrfs).map(|i| (i.fstype, i.label)), Some(("btrfs", "big".into())));

        let mut fat = vec![0u8; 512];
        fat[510..512].copy_from_slice(&[0x55, 0xAA]);
        fat[0x52..0x5a].copy_from_slice(b"FAT32   ");
        fat[0x43..0x47].copy_from_slice(&0x1234_ABCDu32.to_le_bytes());
        fat[0x47..0x52].copy_from_slice(b"CIDATA     ");
        assert_eq!(probe(&fat), Some(FsId { fstype: "vfat", uuid: "1234-ABCD".into(), label: "CIDATA".into() }));

        assert_eq!(probe(&[0u8; 8192]), None);
        assert_eq!(probe(&[]), None, "a short device");
    }

    /// A recording [`Ops`].
    #[derive(Default)]
    struct Fake {
        existing: HashSet<String>,
        files: HashMap<String, Vec<u8>>,
        dirs: HashMap<String, Vec<String>>,
        appear_after: HashMap<String, u32>,
        fail: Vec<(String, i32)>,
        ops: Vec<String>,
        slept: Duration,
    }

    impl Fake {
        fn failing(&self, op: &str) -> Option<io::Error> {
            self.fail.iter().find(|(prefix, _)| op.starts_with(prefix.as_str())).map(|(_, errno)| io::Error::from_raw_os_error(*errno))
        }
    }

    impl Ops for Fake {
        fn exists(&mut self, path: &str) -> bool {
            if let Some(n) = self.appear_after.get_mut(path) {
                if *n == 0 {
                    return true;
                }
                *n -= 1;
                return false;
            }
            self.existing.contains(path) || self.files.contains_key(path)
        }
        fn read_text(&mut self, path: &str) -> io::Result<String> {
            self.files.get(path).map(|b| String::from_utf8_lossy(b).into_owned()).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        }
        fn read_head(&mut self, path: &str, len: usize) -> io::Result<Vec<u8>> {
            self.files.get(path).map(|b| b[..b.len().min(len)].to_vec()).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        }
        fn list_dir(&mut self, path: &str) -> io::Result<Vec<String>> {
            self.dirs.get(path).cloned().ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
        }
        fn make_dir(&mut self, path: &str, follow: bool) -> io::Result<Target> {
            let op = format!("mkdir {path}{}", if follow { "" } else { " nofollow" });
            let failed = self.failing(&op);
            self.ops.push(op);
            failed.map_or(Ok(Target { path: path.into(), fd: None, follow }), Err)
        }
        fn mount(&mut self, source: &str, target: &Target, fstype: &str, flags: u64, data: &str) -> io::Result<()> {
            let op = format!("mount {source} {} {fstype} {flags:#x} {data}", target.path);
            let failed = self.failing(&op);
            self.ops.push(op.trim_end().to_owned());
            failed.map_or(Ok(()), Err)
        }
        fn set_owner(&mut self, target: &Target, uid: Option<u32>, gid: Option<u32>, mode: Option<u32>) -> io::Result<()> {
            self.ops.push(format!("owner {} {uid:?} {gid:?} {mode:?}", target.path));
            Ok(())
        }
        fn umount(&mut self, target: &str, detach: bool, follow: bool) -> io::Result<()> {
            self.ops.push(format!("umount {target}{}{}", if detach { " detach" } else { "" }, if follow { "" } else { " nofollow" }));
            Ok(())
        }
        fn source_flags(&mut self, path: &str) -> u64 {
            if path.starts_with("/run") {
                libc::MS_NOSUID | libc::MS_NODEV
            } else {
                0
            }
        }
        fn sleep(&mut self, d: Duration) {
            self.slept += d;
        }
    }

    fn disks() -> Fake {
        let mut fake = Fake::default();
        fake.dirs.insert("/sys/class/block".into(), vec!["loop0".into(), "sda".into(), "vda".into(), "vda1".into(), "vdb".into()]);
        for dev in ["/dev/loop0", "/dev/sda", "/dev/vda", "/dev/vda1", "/dev/vdb"] {
            fake.existing.insert(dev.into());
        }
        fake.existing.insert("/sys/class/block/vda1/partition".into());
        // vda2 holds the same filesystem as dm-0, the verity device on top of it.
        fake.dirs.get_mut("/sys/class/block").unwrap().extend(["dm-0".to_owned(), "vda2".to_owned()]);
        fake.dirs.insert("/sys/class/block/vda2/holders".into(), vec!["dm-0".into()]);
        for dev in ["/dev/dm-0", "/dev/vda2"] {
            fake.existing.insert(dev.into());
            fake.files.insert(dev.into(), ext4_head("verity", [5; 16]));
        }
        fake.files.insert("/dev/vda1".into(), ext4_head("root", [1; 16]));
        fake.files.insert("/dev/vdb".into(), ext4_head("data", [2; 16]));
        fake.files.insert("/dev/loop0".into(), ext4_head("data", [3; 16]));
        fake.files.insert("/sys/class/block/vdb/serial".into(), b"vol-7\n".to_vec());
        let mut vpd = vec![0u8, 0x80, 0, 8];
        vpd.extend_from_slice(b"scsi-9  ");
        fake.files.insert("/sys/class/block/sda/device/vpd_pg80".into(), vpd);
        fake
    }

    #[test]
    fn finds_devices_by_label_uuid_and_serial() {
        let mut fake = disks();
        let find = |fake: &mut Fake, line: &str| {
            let Kind::Block(dev) = spec(line).kind().unwrap() else { panic!() };
            find_device(fake, &dev, Duration::ZERO)
        };
        assert_eq!(find(&mut fake, "LABEL=data /d").unwrap(), "/dev/vdb", "loop devices are not looked at");
        assert_eq!(find(&mut fake, "UUID=01010101-0101-0101-0101-010101010101 /d").unwrap(), "/dev/vda1");
        assert_eq!(find(&mut fake, "SERIAL=vol-7 /d").unwrap(), "/dev/vdb");
        assert_eq!(find(&mut fake, "SERIAL=scsi-9 /d").unwrap(), "/dev/sda");
        assert_eq!(find(&mut fake, "LABEL=verity /d").unwrap(), "/dev/dm-0", "the held device is skipped");
        let err = find(&mut fake, "LABEL=nothing /d").unwrap_err();
        assert!(err.starts_with("device LABEL=nothing not there after 0.0 s"), "{err}");

        fake.files.insert("/dev/sda".into(), ext4_head("data", [4; 16]));
        let err = find(&mut fake, "LABEL=data /d").unwrap_err();
        assert_eq!(err, "LABEL=data matches /dev/sda and /dev/vdb: refusing to guess; name the device");
    }

    #[test]
    fn mounts_a_block_device_found_by_label() {
        let mut fake = disks();
        let done = mount(&mut fake, &spec("LABEL=data /data auto noatime,x-osb.uid=1000,x-osb.mode=0700"), true, &[]).unwrap();
        assert_eq!(done, Mounted { device: "/dev/vdb".into(), fstype: "ext4".into(), data: String::new() });
        assert_eq!(fake.ops, ["mkdir /data", "mount /dev/vdb /data ext4 0x400", "owner /data Some(1000) None Some(448)"]);

        // A read-only device is mounted read-only.
        let mut fake = disks();
        fake.fail.push(("mount /dev/vdb /data ext4 0x0".into(), libc::EROFS));
        mount(&mut fake, &spec("/dev/vdb /data ext4"), false, &[]).unwrap();
        assert_eq!(fake.ops, ["mkdir /data nofollow", "mount /dev/vdb /data ext4 0x0", "mount /dev/vdb /data ext4 0x1"]);
    }

    #[test]
    fn waits_for_a_device_then_names_it() {
        let mut fake = disks();
        fake.appear_after.insert("/dev/vdc".into(), 10);
        mount(&mut fake, &spec("/dev/vdc /late ext4"), true, &[]).unwrap();
        assert_eq!(fake.slept, POLL * 10);

        let mut fake = disks();
        let err = mount(&mut fake, &spec("/dev/vdz /never ext4 nofail,x-osb.wait=0.2"), true, &[]).unwrap_err();
        assert!(err.nofail);
        assert_eq!(err.to_string(), "mount /dev/vdz on /never: device /dev/vdz not there after 0.2 s; check the VM's disks");
        assert!(fake.ops.is_empty(), "no mount point made for a missing device: {:?}", fake.ops);
    }

    #[test]
    fn builds_each_kinds_mount() {
        let check = |line: &str, expected: &[&str]| {
            let mut fake = disks();
            fake.existing.insert("/data/www".into());
            fake.existing.insert("/run/x".into());
            let hosts = [("files".to_owned(), "10.0.2.2".to_owned())];
            mount(&mut fake, &spec(line), true, &hosts).unwrap_or_else(|e| panic!("{line}: {e}"));
            assert_eq!(fake.ops, expected, "{line}");
        };
        check("share /srv 9p ro,msize=262144", &["mkdir /srv", "mount share /srv 9p 0x1 trans=virtio,version=9p2000.L,msize=262144"]);
        check("myfs /v virtiofs", &["mkdir /v", "mount myfs /v virtiofs 0x0"]);
        // `type bind` is a bind; its flags come from a remount that keeps the source's
        // nosuid/nodev (the fake's /run has both).
        check("/data/www /srv/t bind", &["mkdir /srv/t", "mount /data/www /srv/t  0x1000"]);
        check(
            "/run/x /srv/r/ bind ro",
            &[
                "mkdir /srv/r",
                "mount /run/x /srv/r  0x1001",
                "mkdir /srv/r",
                &format!("mount  /srv/r  {:#x}", libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV),
            ],
        );
        check("files:/export /mnt/nfs nfs", &["mkdir /mnt/nfs", "mount files:/export /mnt/nfs nfs 0x0 addr=10.0.2.2,vers=3,nolock"]);
        check("10.0.2.2:/export /n nfs4 port=2049", &["mkdir /n", "mount 10.0.2.2:/export /n nfs4 0x0 addr=10.0.2.2,vers=4.1,port=2049"]);
        check("none /scratch tmpfs size=16m,x-osb.mode=1777,x-osb.uid=5", &["mkdir /scratch", "mount none /scratch tmpfs 0x0 mode=1777,uid=5,size=16m"]);
        check(
            "/data/www /srv/www none bind,ro,nosuid",
            &[
                "mkdir /srv/www",
                "mount /data/www /srv/www  0x1003",
                "mkdir /srv/www",
                &format!("mount  /srv/www  {:#x}", libc::MS_REMOUNT | libc::MS_BIND | 0x3),
            ],
        );
    }

    #[test]
    fn mount_failures_say_why() {
        let fails = |line: &str, failing: &str, errno: i32| {
            let mut fake = disks();
            fake.fail.push((failing.into(), errno));
            mount(&mut fake, &spec(line), true, &[]).unwrap_err().to_string()
        };
        assert_eq!(
            fails("myfs /v virtiofs dax=always", "mount myfs", libc::EINVAL),
            "mount myfs on /v: virtiofs (dax=always): Invalid argument (os error 22); the virtio-fs device myfs refused DAX: the VMM gives it no DAX window (upstream QEMU has none; Cloud Hypervisor and Kata's QEMU do); mount it without dax"
        );
        assert!(fails("nope /v virtiofs", "mount nope", libc::ENOENT).ends_with("no virtiofs device has the tag \"nope\": check the VM's devices"));
        assert!(fails("/dev/vdb /d xfs", "mount /dev/vdb", libc::EINVAL).ends_with("/dev/vdb does not hold a xfs filesystem, or an option is wrong"));
        assert!(fails("/dev/vdb /d ext4", "mkdir /d", libc::EROFS).starts_with("mount /dev/vdb on /d: create mount point: "));
        let mut fake = disks();
        let err = mount(&mut fake, &spec("files:/e /n nfs"), true, &[]).unwrap_err().to_string();
        assert!(err.contains("not in the run config's hosts"), "{err}");
        let mut fake = disks();
        let err = mount(&mut fake, &spec("/nothing /n none bind"), true, &[]).unwrap_err().to_string();
        assert_eq!(err, "mount /nothing on /n: bind source /nothing does not exist");
        let mut fake = disks();
        fake.files.insert("/dev/vdc".into(), vec![0; 8192]);
        let err = mount(&mut fake, &spec("/dev/vdc /n"), true, &[]).unwrap_err().to_string();
        assert!(err.contains("no filesystem this guest recognises"), "{err}");
    }

    #[test]
    fn splits_flags_from_data() {
        let opts: Vec<String> = ["noatime", "nodev", "size=1m", "exec", "noexec", "data=ordered"].iter().map(|s| s.to_string()).collect();
        assert_eq!(split_options(&opts), (libc::MS_NOATIME | libc::MS_NODEV | libc::MS_NOEXEC, "size=1m,data=ordered".into()));
    }
}
