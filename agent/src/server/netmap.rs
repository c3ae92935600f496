//! Kata's network messages (types.Interface, types.Route, types.IPAddress) to and
//! from the plain structs of [`crate::net`], which does the netlink work.

use ttrpc::Code;

use super::call::status;
use crate::net::{self, Addr, Family, Iface, IfaceUpdate, RouteEntry};
use crate::proto::types::{IPAddress, IPFamily, Interface, Route};

fn family_to_proto(f: Family) -> IPFamily {
    match f {
        Family::V4 => IPFamily::v4,
        Family::V6 => IPFamily::v6,
    }
}

fn family_from_proto(f: protobuf::EnumOrUnknown<IPFamily>) -> ttrpc::Result<Family> {
    match f.enum_value() {
        Ok(IPFamily::v4) => Ok(Family::V4),
        Ok(IPFamily::v6) => Ok(Family::V6),
        Err(n) => Err(status(Code::INVALID_ARGUMENT, format!("unknown IP family {n}"))),
    }
}

/// Maps a `crate::net` error to a status naming `what`.
pub fn net_status(what: &str, e: &std::io::Error) -> ttrpc::Error {
    use std::io::ErrorKind as K;
    let code = match e.kind() {
        K::InvalidInput | K::InvalidData | K::AlreadyExists => Code::INVALID_ARGUMENT,
        K::NotFound => Code::NOT_FOUND,
        K::PermissionDenied => Code::PERMISSION_DENIED,
        _ => Code::INTERNAL,
    };
    status(code, format!("{what}: {e}"))
}

pub fn iface_to_proto(i: &Iface) -> Interface {
    Interface {
        device: i.name.clone(),
        name: i.name.clone(),
        IPAddresses: i
            .addrs
            .iter()
            .map(|a| IPAddress { family: family_to_proto(a.family).into(), address: a.address.clone(), mask: a.prefix_len.to_string(), ..Default::default() })
            .collect(),
        mtu: u64::from(i.mtu),
        hwAddr: i.mac.clone(),
        raw_flags: if i.up { (libc::IFF_UP | libc::IFF_RUNNING) as u32 } else { 0 },
        ..Default::default()
    }
}

/// What UpdateInterface asks for. Like Kata's agent the link is found by its MAC
/// (`hwAddr`) when given, else by `device` (or `name`), gets `name`, the MTU when
/// non-zero and exactly the listed addresses, and is brought up.
pub fn update_from_proto(i: &Interface) -> ttrpc::Result<IfaceUpdate> {
    let addrs = i
        .IPAddresses
        .iter()
        .map(|a| {
            let family = family_from_proto(a.family)?;
            let max = if family == Family::V4 { 32 } else { 128 };
            let prefix_len = match a.mask.trim() {
                "" => max,
                m => m
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= max)
                    .ok_or_else(|| status(Code::INVALID_ARGUMENT, format!("bad prefix length {m:?} for {}", a.address)))?,
            };
            Ok(Addr { family, address: a.address.clone(), prefix_len })
        })
        .collect::<ttrpc::Result<Vec<Addr>>>()?;
    let mtu = match i.mtu {
        0 => None,
        m => Some(u32::try_from(m).map_err(|_| status(Code::INVALID_ARGUMENT, format!("MTU {m} is too large")))?),
    };
    let name = if !i.name.is_empty() { i.name.clone() } else { i.device.clone() };
    if name.is_empty() && i.hwAddr.is_empty() {
        return Err(status(Code::INVALID_ARGUMENT, "the interface has neither a name nor a hwAddr"));
    }
    Ok(IfaceUpdate { name, mac: i.hwAddr.clone(), mtu, addrs, up: true })
}

pub fn route_to_proto(r: &RouteEntry) -> Route {
    Route {
        dest: r.dest.clone(),
        gateway: r.gateway.clone(),
        device: r.device.clone(),
        source: r.source.clone(),
        scope: u32::from(r.scope),
        family: family_to_proto(r.family).into(),
        ..Default::default()
    }
}

pub fn route_from_proto(r: &Route) -> ttrpc::Result<RouteEntry> {
    Ok(RouteEntry {
        dest: r.dest.clone(),
        gateway: r.gateway.clone(),
        device: r.device.clone(),
        source: r.source.clone(),
        scope: u8::try_from(r.scope).map_err(|_| status(Code::INVALID_ARGUMENT, format!("scope {} is out of range", r.scope)))?,
        family: family_from_proto(r.family)?,
    })
}

pub fn list_interfaces() -> ttrpc::Result<Vec<Interface>> {
    let list = net::list_interfaces().map_err(|e| net_status("list interfaces", &e))?;
    Ok(list.iter().map(iface_to_proto).collect())
}

pub fn update_interface(i: &Interface) -> ttrpc::Result<Interface> {
    let want = update_from_proto(i)?;
    let what = if want.mac.is_empty() { format!("update interface {}", want.name) } else { format!("update interface {}", want.mac) };
    let got = net::update_interface(&want).map_err(|e| net_status(&what, &e))?;
    Ok(iface_to_proto(&got))
}

pub fn list_routes() -> ttrpc::Result<Vec<Route>> {
    let list = net::list_routes().map_err(|e| net_status("list routes", &e))?;
    Ok(list.iter().map(route_to_proto).collect())
}

pub fn update_routes(routes: &[Route]) -> ttrpc::Result<Vec<Route>> {
    let want = routes.iter().map(route_from_proto).collect::<ttrpc::Result<Vec<_>>>()?;
    let got = net::update_routes(&want).map_err(|e| net_status("update routes", &e))?;
    Ok(got.iter().map(route_to_proto).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_round_trip() {
        let iface = Iface {
            name: "eth0".into(),
            index: 2,
            mtu: 1400,
            mac: "02:00:00:00:00:01".into(),
            up: true,
            addrs: vec![Addr { family: Family::V4, address: "10.0.0.2".into(), prefix_len: 24 }],
        };
        let proto = iface_to_proto(&iface);
        assert_eq!(proto.IPAddresses[0].mask, "24");
        let update = update_from_proto(&proto).unwrap();
        assert_eq!(update.name, "eth0");
        assert_eq!(update.mac, iface.mac);
        assert_eq!(update.mtu, Some(1400));
        assert_eq!(update.addrs, iface.addrs);
        assert!(update.up);
    }

    #[test]
    fn bad_interfaces() {
        let mut i = Interface::new();
        assert!(update_from_proto(&i).is_err()); // no name, no MAC
        i.name = "eth0".into();
        i.IPAddresses.push(IPAddress { address: "10.0.0.1".into(), mask: "33".into(), ..Default::default() });
        assert!(update_from_proto(&i).is_err());
        i.IPAddresses[0].mask = String::new(); // host address
        assert_eq!(update_from_proto(&i).unwrap().addrs[0].prefix_len, 32);
    }

    #[test]
    fn routes() {
        let r = RouteEntry { dest: String::new(), gateway: "10.0.0.1".into(), device: "eth0".into(), source: String::new(), scope: 0, family: Family::V4 };
        assert_eq!(route_from_proto(&route_to_proto(&r)).unwrap(), r);
        let mut bad = route_to_proto(&r);
        bad.scope = 300;
        assert!(route_from_proto(&bad).is_err());
    }
}
