//! What a sandbox's network costs to set up and tear down, in microseconds (run as root, release):
//! `cargo run --release -p sandboxd-net --example setup_cost [N]`.
//!
//! Per round: a fresh network namespace (the sandbox's, made by the jail in real use, not
//! counted), then [`create_sandbox_link`] (veth pair with its peer created inside the namespace,
//! both ends addressed, routed and up), [`link_stats`] (the accounting read) and, for reference,
//! [`delete_link`] (which the runtime never waits for: a sandbox's pair goes with its namespace).
//! Prints p50/p99 of each.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsFd, OwnedFd};
use std::thread;
use std::time::Instant;

use nix::sched::{CloneFlags, unshare};
use sandboxd_net::{Addressing, create_sandbox_link, delete_link, link_stats};

fn new_netns() -> OwnedFd {
    thread::spawn(|| {
        unshare(CloneFlags::CLONE_NEWNET).unwrap();
        OwnedFd::from(File::open("/proc/thread-self/ns/net").unwrap())
    })
    .join()
    .unwrap()
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let tag = std::process::id() % 10_000;
    let host = format!("sdc{tag}h");
    let addr = Addressing {
        host_v4: Ipv4Addr::new(10, 198, 0, 1),
        sandbox_v4: Ipv4Addr::new(10, 198, 0, 2),
        prefix_v4: 30,
        host_v6: Ipv6Addr::new(0xfd98, 0, 0, 0, 0, 0, 0, 1),
        sandbox_v6: Ipv6Addr::new(0xfd98, 0, 0, 0, 0, 0, 0, 2),
        prefix_v6: 64,
    };
    let (mut create, mut attach, mut delete) = (vec![], vec![], vec![]);
    for _ in 0..rounds {
        let ns = new_netns();
        let t0 = Instant::now();
        create_sandbox_link(&host, 77, ns.as_fd(), &addr).unwrap();
        let t1 = Instant::now();
        link_stats(&host).unwrap().unwrap();
        let t2 = Instant::now();
        delete_link(&host).unwrap();
        let t3 = Instant::now();
        create.push((t1 - t0).as_secs_f64() * 1e6);
        attach.push((t2 - t1).as_secs_f64() * 1e6);
        delete.push((t3 - t2).as_secs_f64() * 1e6);
    }
    // The runtime's stop: every pair of a runtime at once, by link group.
    let namespaces: Vec<OwnedFd> = (0..50).map(|_| new_netns()).collect();
    for (i, ns) in namespaces.iter().enumerate() {
        create_sandbox_link(
            &format!("sdc{tag}g{i}"),
            0x5d00_0000 | tag,
            ns.as_fd(),
            &addr,
        )
        .unwrap();
    }
    let t0 = Instant::now();
    sandboxd_net::delete_group(0x5d00_0000 | tag).unwrap();
    println!(
        "delete_group of 50 pairs: {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    for (name, v) in [
        ("create_sandbox_link", &mut create),
        ("link_stats", &mut attach),
        ("delete_link", &mut delete),
    ] {
        println!(
            "{name:20} p50 {:8.0} us   p99 {:8.0} us",
            percentile(v, 0.5),
            percentile(v, 0.99)
        );
    }
}
