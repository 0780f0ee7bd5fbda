//! Binding of `sandboxd-net` for the runtime: a sandbox's veth pair, created from the host into
//! the sandbox's network namespace, its traffic counters, and clean-up by name or link group.
//! Every call releases the GIL (they are netlink exchanges of a few hundred microseconds, more
//! when the kernel waits for an RCU grace period on delete).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::BorrowedFd;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use sandboxd_net as net;

/// An error of `sandboxd-net` as the `OSError` subclass of its errno (found through the names of
/// the steps it carries), keeping the message that names the step that failed.
fn to_pyerr(err: std::io::Error) -> PyErr {
    match net::errno_of(&err) {
        Some(errno) => PyOSError::new_err((errno, err.to_string())),
        None if err.kind() == std::io::ErrorKind::InvalidInput => {
            PyValueError::new_err(err.to_string())
        }
        None => PyOSError::new_err(err.to_string()),
    }
}

/// Adds the network functions to the module.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(net_create_link, m)?)?;
    m.add_function(wrap_pyfunction!(net_delete_link, m)?)?;
    m.add_function(wrap_pyfunction!(net_delete_group, m)?)?;
    m.add_function(wrap_pyfunction!(net_link_stats, m)?)?;
    m.add_function(wrap_pyfunction!(net_list_links, m)?)?;
    Ok(())
}

fn v4(text: &str) -> PyResult<Ipv4Addr> {
    text.parse()
        .map_err(|_| PyValueError::new_err(format!("not an IPv4 address: {text:?}")))
}

fn v6(text: &str) -> PyResult<Ipv6Addr> {
    text.parse()
        .map_err(|_| PyValueError::new_err(format!("not an IPv6 address: {text:?}")))
}

/// `create_sandbox_link`: the host end `host_name` (link group `group`), the peer as `eth0` in the
/// network namespace open as `netns_fd`, with the two ends' addresses.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (host_name, group, netns_fd, host_v4, sandbox_v4, prefix_v4, host_v6, sandbox_v6, prefix_v6))]
fn net_create_link(
    py: Python<'_>,
    host_name: &str,
    group: u32,
    netns_fd: i32,
    host_v4: &str,
    sandbox_v4: &str,
    prefix_v4: u8,
    host_v6: &str,
    sandbox_v6: &str,
    prefix_v6: u8,
) -> PyResult<()> {
    let addr = net::Addressing {
        host_v4: v4(host_v4)?,
        sandbox_v4: v4(sandbox_v4)?,
        prefix_v4,
        host_v6: v6(host_v6)?,
        sandbox_v6: v6(sandbox_v6)?,
        prefix_v6,
    };
    if netns_fd < 0 {
        return Err(PyValueError::new_err("netns_fd must be an open descriptor"));
    }
    py.detach(|| {
        // SAFETY: the caller passes a descriptor it keeps open for the duration of this call
        // (the Python side holds the file object); it is only borrowed, never closed here.
        #[allow(unsafe_code)]
        let ns = unsafe { BorrowedFd::borrow_raw(netns_fd) };
        net::create_sandbox_link(host_name, group, ns, &addr)
    })
    .map_err(to_pyerr)
}

/// Deletes interface `name` (both ends of a veth pair); False when it did not exist.
#[pyfunction]
fn net_delete_link(py: Python<'_>, name: &str) -> PyResult<bool> {
    py.detach(|| net::delete_link(name)).map_err(to_pyerr)
}

/// Deletes every interface of link `group`.
#[pyfunction]
fn net_delete_group(py: Python<'_>, group: u32) -> PyResult<()> {
    py.detach(|| net::delete_group(group)).map_err(to_pyerr)
}

/// `(rx_bytes, tx_bytes)` of interface `name`, or None when it does not exist.
#[pyfunction]
fn net_link_stats(py: Python<'_>, name: &str) -> PyResult<Option<(u64, u64)>> {
    let stats = py.detach(|| net::link_stats(name)).map_err(to_pyerr)?;
    Ok(stats.map(|s| (s.rx_bytes, s.tx_bytes)))
}

/// Names of the interfaces that start with `prefix`.
#[pyfunction]
fn net_list_links(py: Python<'_>, prefix: &str) -> PyResult<Vec<String>> {
    py.detach(|| net::list_links(prefix)).map_err(to_pyerr)
}
