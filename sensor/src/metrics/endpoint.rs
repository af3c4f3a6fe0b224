//! The metrics endpoint: a listener on the `keywarden-prom` thread that
//! answers `GET /metrics` with `Metrics::render` and anything else with
//! 404.
//!
//! The endpoint answers one request per connection, one connection at a
//! time, within `EXCHANGE_DEADLINE` from accept to last byte and reading at
//! most `REQUEST_MAX` bytes: a slow or silent client holds it that long at
//! most, and never holds the sensor, whose threads never wait for it.
//!
//! Apart from `metrics` (the counts) and `render` (the text format): this
//! is the only part that touches the network.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tracing::{debug, info};

use super::{CONTENT_TYPE, Metrics};

/// How long one connection may take, from accept to its last byte written.
/// A scraper on the same host answers in microseconds; a client that
/// trickles its request or stops reading is cut off here.
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(2);

/// The most of a request that is read: a request line and the headers a
/// scraper sends fit many times over.
const REQUEST_MAX: usize = 8 * 1024;

/// How long the listener waits for a connection before it looks at its
/// stop flag again: the longest the sensor waits for it at exit, with a
/// connection's `EXCHANGE_DEADLINE`.
const ACCEPT_WAIT_MS: u16 = 200;

/// The endpoint: a listener on a thread of its own, stopped when dropped.
pub struct Endpoint {
    /// Where it listens (the port the system chose, for port 0).
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Endpoint {
    /// Listens on `addr` (an IP address and port) and answers scrapes on
    /// the `keywarden-prom` thread. Called before the sensor attaches
    /// anything: an address that is not one, or cannot be bound, stops the
    /// sensor with an error that names it.
    pub fn start(addr: &str, metrics: Arc<Metrics>) -> Result<Self> {
        let at: SocketAddr = addr.parse().map_err(|e| {
            anyhow::anyhow!(
                "metrics endpoint {addr:?}: not an IP address and port such as 127.0.0.1:9464 ({e})"
            )
        })?;
        let listener = TcpListener::bind(at)
            .with_context(|| format!("metrics endpoint {at}: cannot listen"))?;
        // Accepts wait in `poll` with a timeout, so the stop flag is seen.
        listener
            .set_nonblocking(true)
            .with_context(|| format!("metrics endpoint {at}"))?;
        let addr = listener.local_addr().unwrap_or(at);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("keywarden-prom".into())
                .spawn(move || serve(&listener, &metrics, &stop))
                .context("starting the metrics endpoint's thread")?
        };
        let endpoint = Endpoint {
            addr,
            stop,
            thread: Some(thread),
        };
        info!(address = %endpoint.addr, "metrics endpoint: GET http://{}/metrics", endpoint.addr);
        Ok(endpoint)
    }
}

impl Drop for Endpoint {
    /// Stops listening: at most `ACCEPT_WAIT_MS`, or what is left of a
    /// connection's `EXCHANGE_DEADLINE`.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            tracing::error!("the metrics endpoint's thread panicked");
        }
    }
}

/// The listener's loop: one connection at a time, each answered or cut off
/// within `EXCHANGE_DEADLINE`.
fn serve(listener: &TcpListener, metrics: &Metrics, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((conn, peer)) => {
                if let Err(e) = answer(conn, metrics) {
                    debug!(%peer, error = %e, "metrics request not answered");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                let mut fds = [nix::poll::PollFd::new(
                    listener.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ACCEPT_WAIT_MS));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::Interrupted | ErrorKind::ConnectionAborted
                ) => {}
            Err(e) => {
                // Out of descriptors, say: wait rather than spin.
                debug!(error = %e, "metrics endpoint: accept failed");
                std::thread::sleep(Duration::from_millis(u64::from(ACCEPT_WAIT_MS)));
            }
        }
    }
}

/// One connection: reads the request head, answers, closes.
fn answer(mut conn: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let deadline = Instant::now() + EXCHANGE_DEADLINE;
    // Reads and writes wait with timeouts (set before each), which need a
    // blocking socket; Linux does not pass the listener's O_NONBLOCK on,
    // but that is not for this code to rely on.
    conn.set_nonblocking(false)?;
    let response = match read_head(&mut conn, deadline)? {
        Some(head) => respond(&head, metrics),
        None => response(
            "400 Bad Request",
            "text/plain; charset=utf-8",
            "bad request\n",
        ),
    };
    write_within(&mut conn, &response, deadline)?;
    let _ = conn.shutdown(Shutdown::Write);
    Ok(())
}

/// What is left until `deadline`, or `TimedOut` once it has passed.
fn left(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(
            ErrorKind::TimedOut,
            "the exchange took too long",
        ));
    }
    Ok(left)
}

/// The request's head (up to the blank line after its headers), or `None`
/// when it is longer than `REQUEST_MAX` or the client stopped sending
/// before its end.
fn read_head(conn: &mut TcpStream, deadline: Instant) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = head_end(&head) {
            head.truncate(end);
            return Ok(Some(head));
        }
        if head.len() >= REQUEST_MAX {
            return Ok(None);
        }
        conn.set_read_timeout(Some(left(deadline)?))?;
        let want = chunk.len().min(REQUEST_MAX - head.len());
        match conn.read(&mut chunk[..want]) {
            Ok(0) => return Ok(None),
            Ok(n) => head.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Where a request's head ends: the blank line after the headers, `\r\n\r\n`
/// (or `\n\n` from a client that leaves out the carriage returns).
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n");
    crlf.or_else(|| buf.windows(2).position(|w| w == b"\n\n"))
}

/// The response to a request head: the metrics for `GET /metrics` (a query
/// string is ignored), 404 for anything else.
fn respond(head: &[u8], metrics: &Metrics) -> Vec<u8> {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.trim_end_matches('\r').split(' ');
    let method = words.next().unwrap_or_default();
    let target = words.next().unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default();
    if method == "GET" && path == "/metrics" {
        response("200 OK", CONTENT_TYPE, &metrics.render())
    } else {
        response(
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: the metrics are at GET /metrics\n",
        )
    }
}

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body.as_bytes());
    r
}

/// Writes `bytes` by `deadline`, however slowly the client reads.
fn write_within(conn: &mut TcpStream, bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    let mut rest = bytes;
    while !rest.is_empty() {
        conn.set_write_timeout(Some(left(deadline)?))?;
        match conn.write(rest) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One HTTP/1.1 exchange with the endpoint: the response's head and
    /// body.
    fn exchange(addr: SocketAddr, request: &[u8]) -> (String, String) {
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(request).unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
        (head.to_owned(), body.to_owned())
    }

    #[test]
    fn the_endpoint_answers_get_metrics_and_nothing_else() {
        let metrics = Arc::new(Metrics::default());
        metrics.publish(|m| m.libraries = 3);
        let e = Endpoint::start("127.0.0.1:0", metrics).unwrap();
        let (head, body) = exchange(
            e.addr,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n",
        );
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            head.contains("\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8"),
            "{head}"
        );
        assert!(
            head.contains(&format!("\r\nContent-Length: {}", body.len())),
            "{head}"
        );
        assert!(
            body.contains("\nkeywarden_attached_libraries 3\n"),
            "{body}"
        );
        let others: [&[u8]; 3] = [
            b"GET / HTTP/1.1\r\n\r\n",
            b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
            b"GET /metricsx HTTP/1.0\r\n\r\n",
        ];
        for request in others {
            let (head, _) = exchange(e.addr, request);
            assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
        }
        let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        // Exactly the most that is read: nothing is left unread, which
        // would make the close a reset that can beat the answer.
        huge.resize(REQUEST_MAX, b'a');
        let (head, _) = exchange(e.addr, &huge);
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
    }

    /// A client that connects and sends nothing holds the endpoint for
    /// `EXCHANGE_DEADLINE` at most: the next scrape is answered after it.
    #[test]
    fn a_silent_client_delays_the_next_scrape_by_the_deadline_at_most() {
        let e = Endpoint::start("127.0.0.1:0", Arc::new(Metrics::default())).unwrap();
        let silent = TcpStream::connect(e.addr).unwrap();
        let mut trickle = TcpStream::connect(e.addr).unwrap();
        trickle.write_all(b"GET /met").unwrap();
        let started = Instant::now();
        let (head, _) = exchange(e.addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(
            started.elapsed() < 2 * EXCHANGE_DEADLINE + Duration::from_secs(1),
            "answered after {:?}",
            started.elapsed()
        );
        drop((silent, trickle));
    }

    #[test]
    fn an_address_that_is_not_one_or_is_taken_is_named() {
        let m = Arc::new(Metrics::default());
        let err = Endpoint::start("localhost", m.clone()).err().unwrap();
        assert!(format!("{err:#}").contains("\"localhost\""), "{err:#}");
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = Endpoint::start(&addr, m).err().unwrap();
        let text = format!("{err:#}");
        assert!(
            text.contains(&addr) && text.contains("cannot listen"),
            "{text}"
        );
    }
}
