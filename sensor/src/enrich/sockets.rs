//! A process's TCP connection, read from `/proc` when the probes could not
//! name the peer of a signature.
//!
//! The probes name a signature's peer from the connection its thread last
//! received from. That fails where one process talks to the network and
//! another signs for it: OpenSSH's privileged monitor signs the host-key
//! proof that its unprivileged child asked for over a socketpair. The
//! monitor still holds the client's socket, and it is that process's only
//! TCP connection. So, when a process holds exactly one established TCP
//! connection, and a child of it holds that socket too (the child that
//! asked for the signature), that is the peer; otherwise the sensor does
//! not guess. Without the child, a server that signs once as it starts
//! (GnuTLS checks a key against its certificate) and then accepts its
//! first client would have that client named for a signature made before
//! the client connected, whenever the signature is judged after the
//! connection was made.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use hashbrown::HashSet;

/// Descriptors looked at per process: a hostile process may hold a
/// million, and a signer served by one connection holds few.
const MAX_FDS: usize = 4096;

/// Rows of a TCP table read per lookup: a busy host's table can be huge,
/// and this runs on the event thread. A connection past them is not found
/// (the signature then has no peer, rather than a late event).
const MAX_ROWS: usize = 16_384;

/// `ESTABLISHED` in `/proc/net/tcp`'s `st` column.
const TCP_ESTABLISHED: &str = "01";

/// Processes read when looking for the children of a signer: a host may
/// run millions of threads, and the signer's children are found early
/// or not at all.
const MAX_PROCS: usize = 65_536;

/// (remote, local) of the only established TCP connection process `pid`
/// holds, if it holds exactly one and a child of it holds that socket too.
pub fn sole_connection(proc_root: &Path, pid: u32) -> Option<(SocketAddr, SocketAddr)> {
    let (remote, local, inode) = only_connection(proc_root, pid)?;
    held_by_a_child(proc_root, pid, inode).then_some((remote, local))
}

/// Whether a child of `pid` holds the socket `inode`.
fn held_by_a_child(proc_root: &Path, pid: u32, inode: u64) -> bool {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return false;
    };
    dir.flatten()
        .take(MAX_PROCS)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| super::process::parent_of(proc_root, child) == Some(pid))
        .any(|child| {
            socket_inodes(&proc_root.join(child.to_string()).join("fd"))
                .is_some_and(|s| s.contains(&inode))
        })
}

/// (remote, local, socket inode) of the only established TCP connection
/// process `pid` holds, if it holds exactly one.
fn only_connection(proc_root: &Path, pid: u32) -> Option<(SocketAddr, SocketAddr, u64)> {
    let dir = proc_root.join(pid.to_string());
    let inodes = socket_inodes(&dir.join("fd"))?;
    if inodes.is_empty() {
        return None;
    }
    let mut found = None;
    for table in ["net/tcp", "net/tcp6"] {
        let Ok(file) = std::fs::File::open(dir.join(table)) else {
            continue;
        };
        let rows = std::io::BufRead::lines(std::io::BufReader::new(file))
            .map_while(Result::ok)
            .skip(1)
            .take(MAX_ROWS);
        for line in rows {
            let Some(conn) = parse_line(&line) else {
                continue;
            };
            if conn.state == TCP_ESTABLISHED && inodes.contains(&conn.inode) {
                if found.is_some() {
                    return None; // several: no guess
                }
                found = Some((conn.remote, conn.local, conn.inode));
            }
        }
    }
    found
}

/// `LISTEN` in the `st` column.
pub const TCP_LISTEN: &str = "0A";

/// The rows in state `LISTEN` at the head of a TCP table (`lines`, header
/// first). The kernel lists listening sockets before all others, so the
/// first row in another state ends them: a host with many connections has
/// a huge table, of which only the head is read. (local address, inode).
pub fn listening(lines: impl Iterator<Item = String>) -> Vec<(SocketAddr, u64)> {
    lines
        .skip(1)
        .map_while(|line| {
            let c = parse_line(&line)?;
            (c.state == TCP_LISTEN).then_some((c.local, c.inode))
        })
        .filter(|&(_, inode)| inode != 0)
        .collect()
}

/// The inodes of the sockets among a process's descriptors (`socket:[N]`).
pub fn socket_inodes(fd_dir: &Path) -> Option<HashSet<u64>> {
    let mut out = HashSet::new();
    for entry in std::fs::read_dir(fd_dir).ok()?.take(MAX_FDS).flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        let Some(target) = target.to_str() else {
            continue;
        };
        if let Some(n) = target
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|n| n.parse().ok())
        {
            out.insert(n);
        }
    }
    Some(out)
}

/// One row of a TCP table.
pub struct Connection<'a> {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's state, in hex (`01` established, `0A` listening).
    pub state: &'a str,
    pub inode: u64,
}

/// One row of `/proc/PID/net/tcp` or `tcp6`:
/// `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode …`.
pub fn parse_line(line: &str) -> Option<Connection<'_>> {
    let mut f = line.split_whitespace();
    let _slot = f.next()?;
    let local = parse_addr(f.next()?)?;
    let remote = parse_addr(f.next()?)?;
    let state = f.next()?;
    let inode = f.nth(5)?.parse().ok()?;
    Some(Connection {
        local,
        remote,
        state,
        inode,
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits (IPv6), each 32-bit group a
/// word in the host's byte order, then the port in hex.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for group in addr.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(group).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip: IpAddr = match bytes.len() {
        4 => Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into(),
        16 => {
            let v6 = Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?);
            // A v4 client on a dual-stack socket: name it as v4.
            v6.to_ipv4_mapped().map_or(v6.into(), Into::into)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_rows_parse() {
        let v4 = "   1: 0100007F:0016 0100007F:D431 01 00000000:00000000 02:000A7D9B 00000000     0        0 123456 2 0000000000000000 20 4 30 10 -1";
        let c = parse_line(v4).unwrap();
        assert_eq!(c.local, "127.0.0.1:22".parse().unwrap());
        assert_eq!(c.remote, "127.0.0.1:54321".parse().unwrap());
        assert_eq!((c.state, c.inode), ("01", 123456));
        let v6 = "   0: 0000000000000000FFFF00000100007F:0016 0000000000000000FFFF00000200007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 20 4 30 10 -1";
        let c = parse_line(v6).unwrap();
        assert_eq!(c.remote, "127.0.0.2:54321".parse().unwrap());
        let loopback6 = "   0: 00000000000000000000000001000000:0016 00000000000000000000000001000000:D431 0A 00000000:00000000 00:00000000 00000000     0        0 7 1";
        assert_eq!(
            parse_line(loopback6).unwrap().local,
            "[::1]:22".parse().unwrap()
        );
        assert!(parse_line("garbage").is_none());
    }

    /// A process holding one connection that a child of it holds too has
    /// it as its sole connection; without the child, or with two
    /// connections, it has none. (Child processes, because this test
    /// process runs other tests' sockets beside it.)
    #[test]
    fn one_connection_shared_with_a_child_is_named_and_others_are_not() {
        use std::io::BufRead;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let there = listener.local_addr().unwrap();
        for (n, fork) in [(1, true), (1, false), (2, true)] {
            let mut child = std::process::Command::new("python3")
                .args([
                    "-c",
                    "import os, socket, sys, time\n\
                     s = [socket.create_connection(('127.0.0.1', int(sys.argv[1]))) \
                     for _ in range(int(sys.argv[2]))]\n\
                     if sys.argv[3] == 'fork' and os.fork() == 0:\n    time.sleep(30); os._exit(0)\n\
                     time.sleep(0.3)\n\
                     print(s[0].getsockname()[1], flush=True)\n\
                     time.sleep(30)",
                ])
                .arg(there.port().to_string())
                .arg(n.to_string())
                .arg(if fork { "fork" } else { "alone" })
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            std::io::BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let port: u16 = line.trim().parse().unwrap();
            let accepted: Vec<_> = (0..n).map(|_| listener.accept().unwrap()).collect();
            let found = sole_connection(Path::new("/proc"), child.id());
            let only = only_connection(Path::new("/proc"), child.id());
            // The forked child is killed with its group's parent: it is
            // in the same session, and dies with the test's descriptor.
            let _ = std::process::Command::new("pkill")
                .args(["-P", &child.id().to_string()])
                .status();
            child.kill().unwrap();
            child.wait().unwrap();
            drop(accepted);
            let local = SocketAddr::new(there.ip(), port);
            match (n, fork) {
                (1, true) => assert_eq!(found, Some((there, local))),
                (1, false) => {
                    assert_eq!(only.map(|(r, l, _)| (r, l)), Some((there, local)));
                    assert_eq!(found, None, "no child holds it: no guess");
                }
                _ => assert_eq!(found, None, "two connections: no guess"),
            }
        }
    }
}
