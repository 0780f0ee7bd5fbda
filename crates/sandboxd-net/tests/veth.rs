//! A veth pair from the host into a fresh network namespace, with traffic both ways over IPv4
//! and IPv6 (needs root: creates interfaces and namespaces, all removed at the end).

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::thread;
use std::time::Duration;

use nix::sched::{CloneFlags, setns, unshare};
use sandboxd_net::{Addressing, create_sandbox_link, delete_link, link_stats, list_links};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A new, empty network namespace, kept alive by the returned descriptor.
fn new_netns() -> OwnedFd {
    thread::spawn(|| {
        unshare(CloneFlags::CLONE_NEWNET).unwrap();
        OwnedFd::from(File::open("/proc/thread-self/ns/net").unwrap())
    })
    .join()
    .unwrap()
}

/// Runs `f` on a thread inside `netns`.
fn inside<T: Send + 'static>(netns: &OwnedFd, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = netns.try_clone().unwrap();
    thread::spawn(move || {
        setns(&ns, CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn addressing(n: u8) -> Addressing {
    Addressing {
        host_v4: Ipv4Addr::new(10, 199, n, 1),
        sandbox_v4: Ipv4Addr::new(10, 199, n, 2),
        prefix_v4: 30,
        host_v6: Ipv6Addr::new(0xfd99, 0x5a9d, n.into(), 0, 0, 0, 0, 1),
        sandbox_v6: Ipv6Addr::new(0xfd99, 0x5a9d, n.into(), 0, 0, 0, 0, 2),
        prefix_v6: 64,
    }
}

fn echo_once(listener: TcpListener) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).unwrap();
        conn.write_all(&buf).unwrap();
    })
}

#[test]
fn pair_carries_ipv4_and_ipv6_both_ways_and_counts_bytes() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let tag = std::process::id() % 100_000;
    let host = format!("sdt{tag}h");
    let addr = addressing((tag % 200) as u8);
    let ns = new_netns();
    create_sandbox_link(&host, 77, ns.as_fd(), &addr).unwrap();
    let result = std::panic::catch_unwind(|| {
        assert_eq!(
            list_links(&format!("sdt{tag}")).unwrap(),
            vec![host.clone()]
        );
        let before = link_stats(&host).unwrap().unwrap();

        for (gateway, sandbox) in [
            (IpAddr::V4(addr.host_v4), IpAddr::V4(addr.sandbox_v4)),
            (IpAddr::V6(addr.host_v6), IpAddr::V6(addr.sandbox_v6)),
        ] {
            // Sandbox → host gateway.
            let listener = TcpListener::bind(SocketAddr::new(gateway, 0)).unwrap();
            let target = listener.local_addr().unwrap();
            let server = echo_once(listener);
            let peer_seen = inside(&ns, move || {
                let mut c = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
                c.write_all(b"hello").unwrap();
                let mut back = [0u8; 5];
                c.read_exact(&mut back).unwrap();
                assert_eq!(&back, b"hello");
                c.local_addr().unwrap().ip()
            });
            server.join().unwrap();
            assert_eq!(peer_seen, sandbox);
            // Host → sandbox address.
            let listener = inside(&ns, move || {
                TcpListener::bind(SocketAddr::new(sandbox, 0)).unwrap()
            });
            let target = listener.local_addr().unwrap();
            let server = echo_once(listener);
            let mut c = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
            c.write_all(b"again").unwrap();
            let mut back = [0u8; 5];
            c.read_exact(&mut back).unwrap();
            server.join().unwrap();
        }
        let after = link_stats(&host).unwrap().unwrap();
        assert!(after.rx_bytes > before.rx_bytes && after.tx_bytes > before.tx_bytes);
    });
    let existed = delete_link(&host).unwrap();
    result.unwrap();
    assert!(existed);
    assert!(!delete_link(&host).unwrap());
    assert_eq!(link_stats(&host).unwrap(), None);
}

#[test]
fn names_are_checked_and_taken_names_refused() {
    if !is_root() {
        return;
    }
    let ns = new_netns();
    let long = create_sandbox_link("this-name-is-far-too-long", 77, ns.as_fd(), &addressing(1));
    assert_eq!(long.unwrap_err().kind(), std::io::ErrorKind::InvalidInput);
    assert!(create_sandbox_link("bad/name", 77, ns.as_fd(), &addressing(1)).is_err());
    let tag = std::process::id() % 100_000;
    let host = format!("sdu{tag}h");
    create_sandbox_link(&host, 77, ns.as_fd(), &addressing(201)).unwrap();
    // A namespace where eth0 is taken: refused, and the new host end is removed again.
    let host2 = format!("sdv{tag}h");
    let taken = create_sandbox_link(&host2, 77, ns.as_fd(), &addressing(203));
    assert_eq!(link_stats(&host2).unwrap(), None);
    // The same host name again, into another namespace: refused.
    let other = new_netns();
    let again = create_sandbox_link(&host, 77, other.as_fd(), &addressing(202));
    delete_link(&host).unwrap();
    assert!(taken.is_err());
    assert_eq!(again.unwrap_err().kind(), std::io::ErrorKind::AlreadyExists);
}

#[test]
fn delete_group_removes_every_pair_of_the_group_and_nothing_else() {
    if !is_root() {
        return;
    }
    let tag = std::process::id() % 100_000;
    let group = 0x5d00_0000 | tag;
    let names: Vec<String> = (0..3).map(|i| format!("sdg{tag}h{i}")).collect();
    let namespaces: Vec<OwnedFd> = (0..4).map(|_| new_netns()).collect();
    for (i, name) in names.iter().enumerate() {
        create_sandbox_link(
            name,
            group,
            namespaces[i].as_fd(),
            &addressing(210 + i as u8),
        )
        .unwrap();
    }
    let outsider = format!("sdg{tag}x");
    create_sandbox_link(
        &outsider,
        group + 1,
        namespaces[3].as_fd(),
        &addressing(220),
    )
    .unwrap();
    sandboxd_net::delete_group(group).unwrap();
    let left = list_links(&format!("sdg{tag}")).unwrap();
    delete_link(&outsider).unwrap();
    assert_eq!(left, vec![outsider]);
    assert!(sandboxd_net::delete_group(0).is_err());
}
