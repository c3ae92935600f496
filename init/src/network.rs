//! The run config's `network`: interfaces (addresses, MTU), routes, DNS
//! (`/etc/resolv.conf`) and `/etc/hosts`, set up before the mounts (an NFS volume needs
//! the network). The netlink work is the agent's own [`osb_agent::net`], which also
//! serves the host's UpdateInterface and UpdateRoutes.
//!
//! ```json
//! "network": {
//!   "interfaces": [{"name": "eth0", "mac": "52:54:00:12:34:56", "addresses": ["10.0.2.15/24"], "mtu": 1500}],
//!   "routes": [{"dest": "default", "gateway": "10.0.2.2"}],
//!   "dns": {"nameservers": ["10.0.2.3"], "search": ["corp.internal"], "options": ["ndots:2"]},
//!   "hosts": [{"address": "10.0.2.2", "names": ["files"]}]
//! }
//! ```

use std::net::IpAddr;
use std::time::Duration;

use osb_agent::net::{self, Addr, Family, IfaceUpdate, RouteEntry};
use serde_json::Value;

use crate::config::string_list;

/// How long an interface named in the config is waited for (its driver may still be probing).
pub const IFACE_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Interface {
    /// The name to find it by (or, with `mac`, to give it).
    pub name: String,
    pub mac: String,
    pub addresses: Vec<Addr>,
    pub mtu: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Dns {
    pub nameservers: Vec<String>,
    pub search: Vec<String>,
    pub options: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Network {
    pub interfaces: Vec<Interface>,
    pub routes: Vec<RouteEntry>,
    pub dns: Option<Dns>,
    /// `(address, names)`.
    pub hosts: Vec<(String, Vec<String>)>,
}

fn family(ip: &IpAddr) -> Family {
    if ip.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    }
}

fn parse_cidr(text: &str) -> Result<Addr, String> {
    let (ip, len) = text.split_once('/').ok_or_else(|| format!("address {text:?} has no /PREFIX"))?;
    let ip: IpAddr = ip.parse().map_err(|_| format!("address {text:?} is not an IP address"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let prefix_len = len.parse::<u8>().ok().filter(|l| *l <= max).ok_or_else(|| format!("address {text:?}: prefix length must be 0 to {max}"))?;
    Ok(Addr { family: family(&ip), address: ip.to_string(), prefix_len })
}

fn object<'a>(value: &'a Value, what: &str, known: &[&str]) -> Result<&'a serde_json::Map<String, Value>, String> {
    let Value::Object(map) = value else { return Err(format!("{what} must be an object")) };
    if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(format!("{what}: unknown field {k:?} (known: {})", known.join(", ")));
    }
    Ok(map)
}

fn string(map: &serde_json::Map<String, Value>, what: &str, key: &str) -> Result<String, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(format!("{what}: \"{key}\" must be a string")),
    }
}

fn strings(map: &serde_json::Map<String, Value>, what: &str, key: &str) -> Result<Vec<String>, String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => string_list(v).ok_or_else(|| format!("{what}: \"{key}\" must be an array of strings")),
    }
}

fn array<'a>(map: &'a serde_json::Map<String, Value>, what: &str, key: &str) -> Result<&'a [Value], String> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(format!("{what}: \"{key}\" must be an array")),
    }
}

impl Network {
    /// Reads the `network` object; every field is optional, unknown ones are refused.
    pub fn parse(value: &Value) -> Result<Network, String> {
        let map = object(value, "network", &["interfaces", "routes", "dns", "hosts"])?;
        let mut out = Network::default();
        for (i, v) in array(map, "network", "interfaces")?.iter().enumerate() {
            let what = format!("network.interfaces[{i}]");
            let m = object(v, &what, &["name", "mac", "addresses", "mtu"])?;
            let iface = Interface {
                name: string(m, &what, "name")?,
                mac: string(m, &what, "mac")?,
                addresses: strings(m, &what, "addresses")?.iter().map(|a| parse_cidr(a).map_err(|e| format!("{what}: {e}"))).collect::<Result<_, _>>()?,
                mtu: match m.get("mtu") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(
                        v.as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .filter(|n| (68..=65535).contains(n))
                            .ok_or_else(|| format!("{what}: \"mtu\" must be 68 to 65535"))?,
                    ),
                },
            };
            if iface.name.is_empty() && iface.mac.is_empty() {
                return Err(format!("{what}: give \"name\" or \"mac\""));
            }
            out.interfaces.push(iface);
        }
        for (i, v) in array(map, "network", "routes")?.iter().enumerate() {
            let what = format!("network.routes[{i}]");
            let m = object(v, &what, &["dest", "gateway", "device", "source"])?;
            let dest = string(m, &what, "dest")?;
            let gateway = string(m, &what, "gateway")?;
            let mut device = string(m, &what, "device")?;
            let source = string(m, &what, "source")?;
            let gw: Option<IpAddr> =
                if gateway.is_empty() { None } else { Some(gateway.parse().map_err(|_| format!("{what}: gateway {gateway:?} is not an IP address"))?) };
            let dest_family = match dest.as_str() {
                "" | "default" => None,
                d => Some(
                    d.split('/')
                        .next()
                        .unwrap_or(d)
                        .parse::<IpAddr>()
                        .map(|ip| family(&ip))
                        .map_err(|_| format!("{what}: dest {d:?} is not default or an address/prefix"))?,
                ),
            };
            let fam = dest_family.or(gw.as_ref().map(family)).ok_or_else(|| format!("{what}: a default route needs a gateway"))?;
            if gw.as_ref().is_some_and(|g| family(g) != fam) {
                return Err(format!("{what}: the gateway and the destination are of different families"));
            }
            if device.is_empty() {
                // One interface: the route is its.
                match out.interfaces.as_slice() {
                    [only] if !only.name.is_empty() => device = only.name.clone(),
                    _ => return Err(format!("{what}: name the \"device\" (there is not exactly one named interface)")),
                }
            }
            let dest = if dest == "default" { String::new() } else { dest };
            out.routes.push(RouteEntry { dest, gateway, device, source, scope: 0, family: fam });
        }
        if let Some(v) = map.get("dns").filter(|v| !v.is_null()) {
            let m = object(v, "network.dns", &["nameservers", "search", "options"])?;
            let dns = Dns {
                nameservers: strings(m, "network.dns", "nameservers")?,
                search: strings(m, "network.dns", "search")?,
                options: strings(m, "network.dns", "options")?,
            };
            if let Some(bad) = dns.nameservers.iter().find(|n| n.parse::<IpAddr>().is_err()) {
                return Err(format!("network.dns: nameserver {bad:?} is not an IP address"));
            }
            out.dns = Some(dns);
        }
        for (i, v) in array(map, "network", "hosts")?.iter().enumerate() {
            let what = format!("network.hosts[{i}]");
            let m = object(v, &what, &["address", "names"])?;
            let address = string(m, &what, "address")?;
            if address.parse::<IpAddr>().is_err() {
                return Err(format!("{what}: address {address:?} is not an IP address"));
            }
            let names = strings(m, &what, "names")?;
            if names.is_empty() || names.iter().any(|n| n.is_empty() || n.contains(char::is_whitespace)) {
                return Err(format!("{what}: \"names\" must be a non-empty list of names without spaces"));
            }
            out.hosts.push((address, names));
        }
        Ok(out)
    }

    /// `(name, address)` for every name in `hosts` (what an NFS source may name).
    pub fn host_addresses(&self) -> Vec<(String, String)> {
        self.hosts.iter().flat_map(|(addr, names)| names.iter().map(move |n| (n.clone(), addr.clone()))).collect()
    }
}

/// `/etc/resolv.conf`.
pub fn resolv_conf(dns: &Dns) -> String {
    let mut out = String::from("# written by osb-init from /etc/osb/run.json\n");
    for n in &dns.nameservers {
        out.push_str(&format!("nameserver {n}\n"));
    }
    if !dns.search.is_empty() {
        out.push_str(&format!("search {}\n", dns.search.join(" ")));
    }
    if !dns.options.is_empty() {
        out.push_str(&format!("options {}\n", dns.options.join(" ")));
    }
    out
}

/// `/etc/hosts`: loopback names, the hostname on 127.0.1.1 (as Debian does), then the
/// config's entries.
pub fn hosts_file(hostname: &str, hosts: &[(String, Vec<String>)]) -> String {
    let mut out =
        format!("# written by osb-init from /etc/osb/run.json\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{hostname}\n");
    for (addr, names) in hosts {
        out.push_str(&format!("{addr}\t{}\n", names.join(" ")));
    }
    out
}

/// Configures the interfaces and routes. Each interface is waited for up to
/// [`IFACE_WAIT`].
pub fn configure(network: &Network) -> Result<(), String> {
    for iface in &network.interfaces {
        let label = if iface.mac.is_empty() { iface.name.clone() } else { format!("{} (MAC {})", iface.name, iface.mac) };
        let want = IfaceUpdate { name: iface.name.clone(), mac: iface.mac.clone(), mtu: iface.mtu, addrs: iface.addresses.clone(), up: true };
        let mut waited = Duration::ZERO;
        loop {
            match net::update_interface(&want) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && waited < IFACE_WAIT => {
                    std::thread::sleep(Duration::from_millis(20));
                    waited += Duration::from_millis(20);
                }
                Err(e) => return Err(format!("network: interface {label}: {e}")),
            }
        }
    }
    if !network.routes.is_empty() {
        net::update_routes(&network.routes).map_err(|e| format!("network: routes: {e}"))?;
    }
    Ok(())
}

/// Where the files are written before they are bind-mounted over /etc's.
pub const RUN_DIR: &str = "/run/osb";

/// Installs `/etc/NAME` (`resolv.conf`, `hosts`): written to [`RUN_DIR`]`/NAME` and
/// bind-mounted over `/etc/NAME` when that is a regular file (so a read-only root
/// works too, as Docker does it); a missing one or a symbolic link (systemd-resolved's
/// into /run) is replaced by the file itself, which needs a writable /etc.
pub fn install_etc_file(name: &str, text: &str) -> Result<(), String> {
    use osb_agent::volume::{Linux, Ops, Target};
    let staged = format!("{RUN_DIR}/{name}");
    let etc = format!("/etc/{name}");
    std::fs::create_dir_all(RUN_DIR).map_err(|e| format!("create {RUN_DIR}: {e}"))?;
    std::fs::write(&staged, text).map_err(|e| format!("write {staged}: {e}"))?;
    match std::fs::symlink_metadata(&etc) {
        Ok(m) if m.file_type().is_file() => {
            let target = Target { path: etc.clone(), fd: None, follow: false };
            Linux.mount(&staged, &target, "", libc::MS_BIND, "").map_err(|e| format!("bind {staged} over {etc}: {e}"))
        }
        _ => {
            // A temporary name beside it, then rename: never a half-written file.
            let temp = format!("/etc/.{name}.osb-tmp");
            std::fs::write(&temp, text).and_then(|()| std::fs::rename(&temp, &etc)).map_err(|e| {
                let _ = std::fs::remove_file(&temp);
                format!("write {etc}: {e} (it is missing or a symbolic link, and /etc is not writable)")
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Network, String> {
        Network::parse(&serde_json::from_str(text).unwrap())
    }

    #[test]
    fn reads_a_network() {
        let net = parse(
            r#"{"interfaces":[{"name":"eth0","addresses":["10.0.2.15/24","fd00::15/64"],"mtu":1400}],
                "routes":[{"dest":"default","gateway":"10.0.2.2"},{"dest":"10.9.0.0/16","gateway":"10.0.2.9","device":"eth0"}],
                "dns":{"nameservers":["10.0.2.3"],"search":["corp.internal"]},
                "hosts":[{"address":"10.0.2.2","names":["files","files.corp.internal"]}]}"#,
        )
        .unwrap();
        assert_eq!(net.interfaces[0].addresses[1], Addr { family: Family::V6, address: "fd00::15".into(), prefix_len: 64 });
        assert_eq!(net.interfaces[0].mtu, Some(1400));
        assert_eq!((net.routes[0].dest.as_str(), net.routes[0].device.as_str(), net.routes[0].family), ("", "eth0", Family::V4));
        assert_eq!(net.host_addresses(), [("files".to_owned(), "10.0.2.2".to_owned()), ("files.corp.internal".into(), "10.0.2.2".into())]);
        assert_eq!(resolv_conf(net.dns.as_ref().unwrap()), "# written by osb-init from /etc/osb/run.json\nnameserver 10.0.2.3\nsearch corp.internal\n");
        assert!(hosts_file("web", &net.hosts).ends_with("127.0.1.1\tweb\n10.0.2.2\tfiles files.corp.internal\n"));
    }

    #[test]
    fn refuses_bad_networks() {
        for (text, message) in [
            (r#"[]"#, "network must be an object"),
            (r#"{"interface":[]}"#, "unknown field \"interface\""),
            (r#"{"interfaces":[{"addresses":[]}]}"#, "give \"name\" or \"mac\""),
            (r#"{"interfaces":[{"name":"eth0","addresses":["10.0.2.15"]}]}"#, "has no /PREFIX"),
            (r#"{"interfaces":[{"name":"eth0","addresses":["10.0.2.15/33"]}]}"#, "prefix length must be 0 to 32"),
            (r#"{"interfaces":[{"name":"eth0","mtu":9}]}"#, "\"mtu\" must be 68 to 65535"),
            (r#"{"routes":[{"dest":"default","gateway":"10.0.2.2"}]}"#, "name the \"device\""),
            (r#"{"interfaces":[{"name":"eth0"}],"routes":[{"dest":"default"}]}"#, "needs a gateway"),
            (r#"{"interfaces":[{"name":"eth0"}],"routes":[{"dest":"10.0.0.0/8","gateway":"fd00::1"}]}"#, "different families"),
            (r#"{"dns":{"nameservers":["dns.example"]}}"#, "is not an IP address"),
            (r#"{"hosts":[{"address":"10.0.2.2","names":[]}]}"#, "non-empty list"),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(message), "{text}: {err}");
        }
    }
}
