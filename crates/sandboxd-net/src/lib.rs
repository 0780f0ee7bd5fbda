//! Sandbox networking primitives of the sandboxd runtime: a veth pair per sandbox, configured
//! over rtnetlink from the host after the sandbox's network namespace exists.
//!
//! What the kernel does here: a veth pair is two Ethernet devices joined back to back; a frame
//! sent on one arrives on the other. [`create_sandbox_link`] makes one whose host end stays in the
//! host's namespace, with an IPv4 and an IPv6 address (the sandbox's gateway), and whose other end
//! is created directly inside the sandbox's network namespace as `eth0`, with the sandbox's
//! addresses and default routes through the gateway. From then on, the host's routing table and
//! netfilter see the sandbox's packets arrive on the host end, whose name cannot be changed from
//! inside the sandbox: host-side rules keyed on it (the runtime's nftables table) hold whatever
//! the sandbox does to its own routes, addresses or firewall, and if root inside deletes `eth0`
//! the whole pair goes with it. When the sandbox's namespace goes away (its last process exited),
//! the kernel removes the pair by itself.
//!
//! Every host end carries a link group (`IFLA_GROUP`) of its runtime, so [`delete_group`] removes
//! all of a runtime's pairs in one request and one RCU grace period; removing a device waits for
//! one (`synchronize_net`), which costs 25–100 ms each on this kind of VM.
//!
//! IPv6 addresses are added with `IFA_F_NODAD`: duplicate address detection would hold each
//! address "tentative" (unusable) for a second or more after every create, and on a
//! point-to-point link whose both ends we number there is nothing to detect.
//!
//! Why veth and not user-mode networking (`pasta` from Debian's `passt`), measured on this kind of
//! machine (2 cores, Linux 6.18, iperf3 between network namespaces, see `examples/setup_cost.rs`
//! for the setup figure): a veth pair forwarded and masqueraded by the host kernel moved 3.9–4.7
//! Gbit/s down and ~8 Gbit/s up, within the noise of the host's own 4.0–8.6 Gbit/s; `pasta`
//! attached to a namespace moved 2.2–2.8 Gbit/s down and 0.15 Gbit/s up, took ~120 ms to come
//! up, and costs a process with ~30 MiB RSS per sandbox. And with `pasta` a sandbox's traffic
//! leaves as the host's own sockets, so host rules could no longer tell sandboxes apart by
//! interface. A veth pair costs no process and no copy, and a few netlink messages to set up.
#![deny(unsafe_code)]

mod rtnl;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};

use rtnl::Rtnl;

/// The name the sandbox's end of its veth pair gets inside the sandbox.
pub const SANDBOX_IFNAME: &str = "eth0";

/// Longest interface name the kernel accepts (`IFNAMSIZ` − 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Both ends' addresses of one sandbox's link: the host end is the sandbox's gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addressing {
    /// The host end's IPv4 address (the sandbox's IPv4 gateway).
    pub host_v4: Ipv4Addr,
    /// The sandbox's IPv4 address.
    pub sandbox_v4: Ipv4Addr,
    /// Prefix length of the IPv4 link (both ends are in it).
    pub prefix_v4: u8,
    /// The host end's IPv6 address (the sandbox's IPv6 gateway).
    pub host_v6: Ipv6Addr,
    /// The sandbox's IPv6 address.
    pub sandbox_v6: Ipv6Addr,
    /// Prefix length of the IPv6 link.
    pub prefix_v6: u8,
}

/// Traffic counters of one interface, as the kernel keeps them (`IFLA_STATS64`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Bytes the interface received.
    pub rx_bytes: u64,
    /// Bytes the interface sent.
    pub tx_bytes: u64,
    /// Packets the interface received.
    pub rx_packets: u64,
    /// Packets the interface sent.
    pub tx_packets: u64,
}

fn check_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?} must be 1-{MAX_IFNAME_LEN} bytes of [A-Za-z0-9._-]"),
        ))
    }
}

/// An error of a netlink step, named: "`what`: `source`". It keeps the kernel's error as its
/// source, so [`errno_of`] still finds the errno (the binding turns `EEXIST` into
/// `FileExistsError`, which the runtime's stale-link clean-up depends on).
#[derive(Debug)]
struct Context {
    what: String,
    source: io::Error,
}

impl std::fmt::Display for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.source)
    }
}

impl std::error::Error for Context {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn with_context(err: io::Error, what: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        err.kind(),
        Context {
            what: what.to_string(),
            source: err,
        },
    )
}

/// The errno of an error of this crate, looking through the steps' names it carries.
pub fn errno_of(err: &io::Error) -> Option<i32> {
    let mut err = err;
    loop {
        if let Some(errno) = err.raw_os_error() {
            return Some(errno);
        }
        err = &err.get_ref()?.downcast_ref::<Context>()?.source;
    }
}

/// Creates the veth pair of one sandbox: `host_name` in the caller's network namespace, with the
/// gateway addresses of `addr`, up; and its peer directly inside the network namespace `netns`
/// (an open `/proc/<pid>/ns/net`) as [`SANDBOX_IFNAME`], with the sandbox's addresses, up, and
/// default routes through the host end. Fails with `AlreadyExists` if `host_name` is taken; on
/// any failure nothing is left behind.
///
/// The peer is created where it lives rather than moved there: moving a device between
/// namespaces waits for an RCU grace period (`synchronize_net`), which measured 25–50 ms on
/// this kind of VM, while creating it in place waits for nothing (`examples/setup_cost.rs`).
/// The host end joins link group `group` (see [`delete_group`]).
pub fn create_sandbox_link(
    host_name: &str,
    group: u32,
    netns: BorrowedFd<'_>,
    addr: &Addressing,
) -> io::Result<()> {
    check_name(host_name)?;
    let mut host = Rtnl::new()?;
    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(SANDBOX_IFNAME.into()));
    peer.attributes
        .push(LinkAttribute::NetNsFd(netns.as_raw_fd()));
    let mut link = LinkMessage::default();
    link.attributes
        .push(LinkAttribute::IfName(host_name.into()));
    link.attributes.push(LinkAttribute::Group(group));
    link.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    host.request(
        RouteNetlinkMessage::NewLink(link),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map_err(|e| with_context(e, format_args!("creating veth pair {host_name}")))?;
    let result = (|| {
        let index = link_index(&mut host, host_name)?;
        add_address(&mut host, index, addr.host_v4.into(), addr.prefix_v4)?;
        add_address(&mut host, index, addr.host_v6.into(), addr.prefix_v6)?;
        set_up(&mut host, index)?;
        let mut inside = Rtnl::in_netns(netns)?;
        let index = link_index(&mut inside, SANDBOX_IFNAME)?;
        add_address(&mut inside, index, addr.sandbox_v4.into(), addr.prefix_v4)?;
        add_address(&mut inside, index, addr.sandbox_v6.into(), addr.prefix_v6)?;
        set_up(&mut inside, index)?;
        add_default_route(&mut inside, index, addr.host_v4.into())?;
        add_default_route(&mut inside, index, addr.host_v6.into())
    })();
    if let Err(e) = result {
        let _ = delete_with(&mut host, host_name);
        return Err(with_context(e, format_args!("configuring {host_name}")));
    }
    Ok(())
}

/// Deletes the interface `name` in the caller's namespace (for a veth end, both ends go).
/// Returns false when there was no such interface.
pub fn delete_link(name: &str) -> io::Result<bool> {
    check_name(name)?;
    let mut nl = Rtnl::new()?;
    delete_with(&mut nl, name)
}

fn delete_with(nl: &mut Rtnl, name: &str) -> io::Result<bool> {
    let mut link = LinkMessage::default();
    link.attributes.push(LinkAttribute::IfName(name.into()));
    match nl.request(RouteNetlinkMessage::DelLink(link), 0) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => Ok(false),
        Err(e) => Err(with_context(e, format_args!("deleting {name}"))),
    }
}

/// Deletes every interface of link group `group` in the caller's namespace (with their veth
/// peers), in one request.
pub fn delete_group(group: u32) -> io::Result<()> {
    if group == 0 {
        // Group 0 is the kernel's default: every interface without a group.
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "link group 0 is everyone's",
        ));
    }
    let mut nl = Rtnl::new()?;
    let mut link = LinkMessage::default();
    link.attributes.push(LinkAttribute::Group(group));
    match nl.request(RouteNetlinkMessage::DelLink(link), 0) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => Ok(()),
        Err(e) => Err(with_context(e, format_args!("deleting link group {group}"))),
    }
}

/// The traffic counters of interface `name` in the caller's namespace, or None if it is gone.
pub fn link_stats(name: &str) -> io::Result<Option<LinkStats>> {
    check_name(name)?;
    let mut nl = Rtnl::new()?;
    Ok(get_link(&mut nl, name)?.map(|(_, stats)| stats))
}

/// Names of the interfaces in the caller's namespace that start with `prefix` (to find what a
/// previous runtime left behind).
pub fn list_links(prefix: &str) -> io::Result<Vec<String>> {
    let mut nl = Rtnl::new()?;
    let answers = nl.dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?;
    let mut names = Vec::new();
    for answer in answers {
        if let RouteNetlinkMessage::NewLink(link) = answer {
            for attribute in link.attributes {
                if let LinkAttribute::IfName(name) = attribute
                    && name.starts_with(prefix)
                {
                    names.push(name);
                }
            }
        }
    }
    Ok(names)
}

fn get_link(nl: &mut Rtnl, name: &str) -> io::Result<Option<(u32, LinkStats)>> {
    let mut query = LinkMessage::default();
    query.attributes.push(LinkAttribute::IfName(name.into()));
    // A GETLINK by name answers one NEWLINK message, or ENODEV.
    let answer = match nl.get(RouteNetlinkMessage::GetLink(query)) {
        Ok(answer) => answer,
        Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => return Ok(None),
        Err(e) => return Err(e),
    };
    let RouteNetlinkMessage::NewLink(link) = answer else {
        return Err(io::Error::other("rtnetlink: unexpected answer to GETLINK"));
    };
    let mut stats = LinkStats::default();
    for attribute in &link.attributes {
        if let LinkAttribute::Stats64(s) = attribute {
            stats = LinkStats {
                rx_bytes: s.rx_bytes,
                tx_bytes: s.tx_bytes,
                rx_packets: s.rx_packets,
                tx_packets: s.tx_packets,
            };
        }
    }
    Ok(Some((link.header.index, stats)))
}

fn link_index(nl: &mut Rtnl, name: &str) -> io::Result<u32> {
    match get_link(nl, name)? {
        Some((index, _)) => Ok(index),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface named {name}"),
        )),
    }
}

fn set_up(nl: &mut Rtnl, index: u32) -> io::Result<()> {
    let mut link = LinkMessage::default();
    link.header.index = index;
    link.header.flags = LinkFlags::Up;
    link.header.change_mask = LinkFlags::Up;
    nl.request(RouteNetlinkMessage::SetLink(link), 0)
}

fn add_address(nl: &mut Rtnl, index: u32, ip: IpAddr, prefix: u8) -> io::Result<()> {
    let mut message = AddressMessage::default();
    message.header.index = index;
    message.header.prefix_len = prefix;
    message.header.scope = AddressScope::Universe;
    message.header.family = match ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    message.attributes.push(AddressAttribute::Local(ip));
    message.attributes.push(AddressAttribute::Address(ip));
    if ip.is_ipv6() {
        message.header.flags = AddressHeaderFlags::Nodad;
        message
            .attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    nl.request(
        RouteNetlinkMessage::NewAddress(message),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map_err(|e| with_context(e, format_args!("adding address {ip}/{prefix}")))
}

fn add_default_route(nl: &mut Rtnl, index: u32, gateway: IpAddr) -> io::Result<()> {
    let mut message = RouteMessage::default();
    message.header.table = RouteHeader::RT_TABLE_MAIN;
    message.header.protocol = RouteProtocol::Boot;
    message.header.scope = RouteScope::Universe;
    message.header.kind = RouteType::Unicast;
    let (family, gw) = match gateway {
        IpAddr::V4(v4) => (AddressFamily::Inet, RouteAddress::Inet(v4)),
        IpAddr::V6(v6) => (AddressFamily::Inet6, RouteAddress::Inet6(v6)),
    };
    message.header.address_family = family;
    message.attributes.push(RouteAttribute::Gateway(gw));
    message.attributes.push(RouteAttribute::Oif(index));
    nl.request(
        RouteNetlinkMessage::NewRoute(message),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map_err(|e| with_context(e, format_args!("adding the default route via {gateway}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_errors_keep_their_errno() {
        let kernel = io::Error::from_raw_os_error(nix::libc::EEXIST);
        let named = with_context(
            with_context(kernel, "creating veth pair x"),
            "configuring x",
        );
        assert_eq!(errno_of(&named), Some(nix::libc::EEXIST));
        assert_eq!(named.kind(), io::ErrorKind::AlreadyExists);
        assert!(
            named
                .to_string()
                .starts_with("configuring x: creating veth pair x: ")
        );
        assert_eq!(errno_of(&io::Error::other("no errno")), None);
    }
}
