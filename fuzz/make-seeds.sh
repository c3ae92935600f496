#!/usr/bin/env bash
# Writes the committed seed corpora in fuzz/corpus/<target>/ (run from anywhere;
# deterministic: fixed mtimes, owners, order and random seeds). The seeds are
# real inputs made by the tools that own the formats (GNU tar, gzip, zstd) or
# written to their specifications (OCI documents, ttrpc frames); libFuzzer
# starts from them and keeps what it finds in the target directory.
set -euo pipefail
cd "$(dirname "$0")"
C=corpus
rm -rf "$C"
mkdir -p "$C"/{layer,oci_manifest,cpio,disk,kernel_fragment,ttrpc,init_cmdline,init_run_json}
W="$(mktemp -d)"; trap 'rm -rf "$W"' EXIT

# --- layer: tar layers from GNU tar, plain and compressed -------------------------
tarit() { # tarit OUT DIR [extra tar args]
  local out="$1" dir="$2"; shift 2
  tar --sort=name --mtime=@1700000000 --owner=0 --group=0 --numeric-owner -C "$dir" "$@" -cf "$out" .
}
mkdir -p "$W/a/etc" "$W/a/usr/bin" "$W/a/var/empty"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$W/a/etc/passwd"
printf '#!/bin/sh\necho hi\n' > "$W/a/usr/bin/hi"; chmod 4755 "$W/a/usr/bin/hi"
ln "$W/a/usr/bin/hi" "$W/a/usr/bin/hi2"
ln -s ../etc/passwd "$W/a/usr/pw"
mkfifo "$W/a/var/fifo"
long="$W/a/$(printf 'd%.0s' {1..120})/$(printf 'f%.0s' {1..120})"; mkdir -p "$(dirname "$long")"; echo x > "$long"
tarit "$C/layer/gnu.tar" "$W/a" --format=gnu
tarit "$C/layer/pax.tar" "$W/a" --format=pax --pax-option=delete=atime,delete=ctime
tarit "$C/layer/ustar.tar" "$W/a/etc" --format=ustar
gzip -9n < "$C/layer/ustar.tar" > "$C/layer/ustar.tar.gz"
zstd -q -19 < "$C/layer/ustar.tar" > "$C/layer/ustar.tar.zst"
# Whiteouts and an opaque directory (what a second layer holds).
mkdir -p "$W/b/etc" "$W/b/usr"; : > "$W/b/etc/.wh.passwd"; : > "$W/b/usr/.wh..wh..opq"; echo new > "$W/b/usr/new"
tarit "$C/layer/whiteouts.tar" "$W/b" --format=ustar
# Hostile: a path with .., an absolute hard link, a symlink leading out.
python3 - "$C/layer" <<'PY'
import io, sys, tarfile
def layer(name, entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for kind, path, arg in entries:
            ti = tarfile.TarInfo(path); ti.mtime = 1700000000
            data = None
            if kind == "file": data = arg; ti.size = len(arg)
            elif kind == "sym": ti.type = tarfile.SYMTYPE; ti.linkname = arg
            elif kind == "hard": ti.type = tarfile.LNKTYPE; ti.linkname = arg
            elif kind == "dir": ti.type = tarfile.DIRTYPE
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    open(f"{sys.argv[1]}/{name}", "wb").write(buf.getvalue())
layer("escape.tar", [("sym", "up", "../.."), ("file", "up/etc/x", b"x")])
layer("dotdot.tar", [("file", "a/../../evil", b"x")])
layer("hardlink.tar", [("file", "f", b"data"), ("hard", "g", "f"), ("hard", "h", "/etc/shadow")])
layer("replace.tar", [("dir", "d", None), ("file", "d/x", b"1"), ("file", "d", b"now a file"), ("sym", "d", "x")])
PY

# --- oci_manifest: index NUL manifest NUL config NUL layer, with placeholders ------
oci() { printf '%s\0%s\0%s\0' "$2" "$3" "$4" > "$C/oci_manifest/$1"; cat "$5" >> "$C/oci_manifest/$1"; }
IDX='{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"@M@","size":@MS@,"annotations":{"org.opencontainers.image.ref.name":"latest"}}]}'
MAN='{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"@C@","size":@CS@},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"@L@","size":@LS@}]}'
CFG='{"created":"2024-01-02T03:04:05.678Z","architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin"],"Entrypoint":["/bin/sh"],"Cmd":["-c","true"],"WorkingDir":"/","User":"0:0"},"rootfs":{"type":"layers","diff_ids":["@L@"]}}'
oci oci-plain "$IDX" "$MAN" "$CFG" "$C/layer/ustar.tar"
oci oci-gzip "$IDX" "${MAN/v1.tar\"/v1.tar+gzip\"}" '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}' "$C/layer/ustar.tar.gz"
DOCKER='{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"@C@","size":@CS@},"layers":[{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"@L@","size":@LS@}]}'
oci docker-v2s2 "$IDX" "$DOCKER" "$CFG" "$C/layer/ustar.tar.gz"
MULTI='{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"@M@","size":@MS@,"platform":{"architecture":"arm64","os":"linux","variant":"v8"}},{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"@M@","size":@MS@,"platform":{"architecture":"amd64","os":"linux"}}]}'
oci multi-platform "$MULTI" "$MAN" "$CFG" "$C/layer/whiteouts.tar"
NESTED='{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"@M@","size":@MS@}]}'
oci nested-index "$NESTED" "$MULTI" "$CFG" "$C/layer/ustar.tar"

# --- cpio, disk: bytes for the tree decoder (osbuilder/src/fuzzing/treegen.rs) ------
python3 - "$C" <<'PY'
import random, sys
rng = random.Random(20261201)
for i, n in enumerate([16, 48, 96, 200, 400, 800, 1600, 3000]):
    data = bytes(rng.randrange(256) for _ in range(n))
    for target in ("cpio", "disk"):
        open(f"{sys.argv[1]}/{target}/random-{i}", "wb").write(data)
# Every kind of entry (the unit test generated_trees_have_every_kind_of_entry).
kinds = bytes([0,0,2,0o55,0o7,0,1, 1,1,2,0,0o44,0o1,64,2,2,1,2,7,0x81, 3,0,0,0o77,0o1,0,9,6, 4,0,3,0,0,0,9,1,
               5,0,14,0,0,0,9,1,0,3,0,0,0, 7,0,6,0,0,0,9])
for target in ("cpio", "disk"):
    open(f"{sys.argv[1]}/{target}/every-kind", "wb").write(kinds)
# Many names in one directory (htree), long names, xattrs on each.
big = bytearray()
for i in range(60):
    big += bytes([0x21 | (i % 3) << 5, 1, 0, 200 + (i % 40), i, i >> 8, 0o44, 0o1, 0x40 | i % 60, 7]) + bytes(24)
for target in ("cpio", "disk"):
    open(f"{sys.argv[1]}/{target}/wide-dir", "wb").write(bytes(big))
PY

# --- kernel_fragment: the project's own fragments ---------------------------------
for f in ../kernel-config/fragments/*/*.conf; do cp "$f" "$C/kernel_fragment/$(basename "$(dirname "$f")")-$(basename "$f")"; done
printf 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_S="quoted value"\nCONFIG_N=0x10\nCONFIG_M=m\n' > "$C/kernel_fragment/kinds.conf"
printf 'CONFIG_A=y\nCONFIG_A=n\n' > "$C/kernel_fragment/conflict.conf"

# --- ttrpc: frames as a client sends them ------------------------------------------
python3 - "$C/ttrpc" <<'PY'
import struct, sys
def varint(n):
    out = b""
    while True:
        b = n & 0x7f; n >>= 7
        if n: out += bytes([b | 0x80])
        else: return out + bytes([b])
def field(num, data):  # length-delimited
    return varint(num << 3 | 2) + varint(len(data)) + data
def vfield(num, n):
    return varint(num << 3) + varint(n)
def request(service, method, payload=b"", timeout=0):
    r = field(1, service.encode()) + field(2, method.encode()) + field(3, payload)
    return r + (vfield(4, timeout) if timeout else b"")
def frame(stream, msg, kind=1):
    return struct.pack(">IIBB", len(msg), stream, kind, 0) + msg
def put(name, data): open(f"{sys.argv[1]}/{name}", "wb").write(data)
A = "grpc.AgentService"
put("health-check", frame(1, request("grpc.Health", "Check")))
put("version", frame(1, request("grpc.Health", "Version", field(1, b"0.0.1"))))
put("guest-details", frame(1, request(A, "GetGuestDetails", vfield(1, 1) + vfield(2, 1))))
put("metrics", frame(3, request(A, "GetMetrics")))
put("wait-missing", frame(1, request(A, "WaitProcess", field(1, b"c") + field(2, b"e"), 1_000_000_000)))
put("read-stdout", frame(1, request(A, "ReadStdout", field(1, b"c") + field(2, b"e") + vfield(3, 1024))))
put("signal", frame(1, request(A, "SignalProcess", field(1, b"c") + field(2, b"") + vfield(3, 15))))
put("exec", frame(1, request(A, "ExecProcess", field(1, b"c") + field(2, b"e") + field(5, field(3, b"/bin/true")))))
put("copy-file", frame(1, request(A, "CopyFile", field(1, b"/tmp/x") + vfield(2, 3) + field(7, b"abc"))))
put("list", frame(1, request(A, "ListInterfaces")) + frame(3, request(A, "ListRoutes")))
put("unknown", frame(1, request("x.Y", "Z")) + frame(3, request(A, "Nope")))
put("bad-streams", frame(2, request(A, "GetMetrics")) + frame(1, request(A, "GetMetrics")) + frame(1, request(A, "GetMetrics")))
put("data-frame", frame(1, b"\x00\x01", kind=3) + frame(3, b"", kind=7))
put("too-long", struct.pack(">IIBB", 5 << 20, 1, 1, 0) + b"\x00" * 64)
put("garbage", b"\xff" * 10 + b"not protobuf")
put("cut", frame(1, request(A, "GetMetrics"))[:-3])
PY

# --- init: kernel command lines and run.json ---------------------------------------
cl() { printf '%s' "$2" > "$C/init_cmdline/$1"; }
cl plain 'console=ttyS0 reboot=k panic=1 osb.root=/dev/vda osb.rootfstype=ext4 osb.ro=1'
cl dax 'root=/dev/pmem0p1 rootflags=dax,data=ordered osb.root=/dev/pmem0p1 osb.dax=1 osb.overlay=1'
cl lists 'osb.cmd=["sh","-c","echo a b"] osb.entrypoint=/bin/env osb.env=A=1 osb.env="B=two words" osb.workdir=/tmp'
cl quotes '"osb.hostname=a b" osb.user=nobody:nogroup osb.on_exit=stay osb.agent.port=2000 osb.shutdown_timeout=1.5 -- init args'
cl virtiofs 'osb.root=virtiofs:myfs osb.debug=1 osb.entropy=00ff11ee osb.agent=0'
cl verity 'dm-mod.create="vroot,,,ro,0 8 verity 1 /dev/vda1 /dev/vda2 4096 4096 1 1 sha256 00 11" osb.root=/dev/dm-0'
cl bad 'osb.root=/etc/passwd osb.dax=maybe osb.bogus=1 osb.cmd=[1,2'
rj() { printf '%s' "$2" > "$C/init_run_json/$1"; }
rj nginx '{"entrypoint": ["/docker-entrypoint.sh"], "cmd": ["nginx", "-g", "daemon off;"], "env": ["PATH=/usr/local/sbin:/usr/bin", "NGINX_VERSION=1.25.3"], "working_dir": "/", "user": "", "hostname": null}'
rj minimal '{}'
printf '{"cmd":["sleep","1"],"env":["A=1","A=2","PATH"]}\0osb.env=A=3 osb.cmd=["true"] osb.user=1000:1000' > "$C/init_run_json/override"
rj wrong-types '{"cmd":"not a list","env":[1,2]}'
printf '{"entrypoint":["/bin/sh"],"cmd":["-c","x"]}\0osb.entrypoint=["/bin/echo"] osb.workdir=' > "$C/init_run_json/entrypoint-only"
echo "seeds written under $(pwd)/$C" >&2
