//! A synchronous rtnetlink client: one `NETLINK_ROUTE` socket, requests that the kernel
//! acknowledges, and dumps.
//!
//! What the kernel does here: a `NETLINK_ROUTE` socket talks to the routing subsystem of the
//! network namespace it was *created* in, for its whole life, whichever thread later uses it.
//! So [`Rtnl::in_netns`] has a short-lived helper thread enter a sandbox's namespace
//! (`setns(CLONE_NEWNET)` changes only that thread), create the socket and end; the caller's
//! threads never change namespace, and every request on the socket then configures the sandbox.
//!
//! Each request carries `NLM_F_ACK`, and the kernel answers with an `NLMSG_ERROR` whose code is
//! 0 (done) or a negative errno, which becomes the returned [`io::Error`]. The exchanges are a few
//! tens of microseconds each (the kernel does the work inside the `send`), so a plain blocking
//! socket without an event loop is the simplest correct client.

use std::io;
use std::os::fd::BorrowedFd;
use std::thread;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};
use nix::sched::{CloneFlags, setns};

/// Receive buffer: the kernel answers a dump in datagrams of at most a page or so per message
/// batch (`NLMSG_GOODSIZE`, 8 KiB on 4 KiB-page systems); 64 KiB holds any of them whole.
const RECV_BUFFER: usize = 64 * 1024;

/// Stack for the helper thread that opens a socket inside a namespace: it makes three system
/// calls, so 64 KiB is far more than enough and keeps thread creation cheap.
const HELPER_STACK_BYTES: usize = 64 * 1024;

/// One rtnetlink socket and the sequence numbers of its requests.
pub(crate) struct Rtnl {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Rtnl {
    /// A socket in the caller's network namespace.
    pub(crate) fn new() -> io::Result<Rtnl> {
        Rtnl::from_socket(Socket::new(NETLINK_ROUTE)?)
    }

    /// A socket in the network namespace `netns` (an open `/proc/<pid>/ns/net`), opened by a
    /// helper thread that alone enters it.
    pub(crate) fn in_netns(netns: BorrowedFd<'_>) -> io::Result<Rtnl> {
        let ns = netns.try_clone_to_owned()?;
        let helper = thread::Builder::new()
            .name("netns-rtnl".into())
            .stack_size(HELPER_STACK_BYTES)
            .spawn(move || -> io::Result<Socket> {
                setns(&ns, CloneFlags::CLONE_NEWNET)?;
                Socket::new(NETLINK_ROUTE)
            })?;
        let sock = helper
            .join()
            .map_err(|_| io::Error::other("netns helper thread panicked"))??;
        Rtnl::from_socket(sock)
    }

    fn from_socket(mut sock: Socket) -> io::Result<Rtnl> {
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl {
            sock,
            seq: 0,
            buf: vec![0; RECV_BUFFER],
        })
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(message));
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        self.sock.send(&bytes, 0)?;
        Ok(self.seq)
    }

    /// Sends `message` with `flags | NLM_F_REQUEST | NLM_F_ACK` and waits for the kernel's answer.
    pub(crate) fn request(&mut self, message: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let seq = self.send(message, flags | NLM_F_REQUEST | NLM_F_ACK)?;
        let mut done = false;
        self.receive(seq, |payload| match payload {
            NetlinkPayload::Error(e) => {
                done = true;
                match e.code {
                    None => Ok(true),
                    Some(_) => Err(e.to_io()),
                }
            }
            _ => Ok(false),
        })?;
        if done {
            Ok(())
        } else {
            Err(io::Error::other("rtnetlink: no acknowledgement"))
        }
    }

    /// Sends a dump request and returns every message of the answer.
    pub(crate) fn dump(
        &mut self,
        message: RouteNetlinkMessage,
    ) -> io::Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(message, NLM_F_REQUEST | NLM_F_DUMP)?;
        let mut out = Vec::new();
        self.receive(seq, |payload| match payload {
            NetlinkPayload::InnerMessage(m) => {
                out.push(m);
                Ok(false)
            }
            NetlinkPayload::Done(_) => Ok(true),
            NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
            _ => Ok(false),
        })?;
        Ok(out)
    }

    /// Sends a request that the kernel answers with exactly one message (a GET by name or
    /// index), and returns that message.
    pub(crate) fn get(&mut self, message: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
        let seq = self.send(message, NLM_F_REQUEST)?;
        let mut found = None;
        self.receive(seq, |payload| match payload {
            NetlinkPayload::InnerMessage(m) => {
                found = Some(m);
                Ok(true)
            }
            NetlinkPayload::Error(e) if e.code.is_some() => Err(e.to_io()),
            _ => Ok(false),
        })?;
        found.ok_or_else(|| io::Error::other("rtnetlink: no answer"))
    }

    /// Reads datagrams, handing every message of sequence `seq` to `each` until it returns true.
    fn receive(
        &mut self,
        seq: u32,
        mut each: impl FnMut(NetlinkPayload<RouteNetlinkMessage>) -> io::Result<bool>,
    ) -> io::Result<()> {
        loop {
            let mut filled: &mut [u8] = &mut self.buf[..];
            let len = self.sock.recv(&mut filled, 0)?;
            let mut at = 0;
            while at < len {
                let packet = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[at..len])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let size = packet.header.length as usize;
                if size == 0 {
                    break;
                }
                at += (size + 3) & !3; // messages are 4-byte aligned
                if packet.header.sequence_number != seq {
                    continue; // an answer to an earlier request that gave up
                }
                if each(packet.payload)? {
                    return Ok(());
                }
            }
        }
    }
}
