//! A fault-injecting HTTP proxy on a free loopback port, to put in front of a
//! [`crate::Registry`]: it answers `503 Service Unavailable`, or drops the connection,
//! for chosen requests and forwards the others. It can also shape the link
//! ([`FaultProxy::shape`]): a delay before each request is forwarded, and one bandwidth
//! limit shared by every connection, as a WAN link to a registry would have.
//!
//! Every forwarded request is sent upstream with `Connection: close`, so each client
//! connection carries exactly one request and the proxy never has to parse a response:
//! it relays bytes until the registry closes. The `Host` header is kept, so the
//! registry's `Location` headers point back at the proxy.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

/// Request heads kept for [`FaultProxy::heads`].
pub const MAX_HEADS: usize = 4096;

/// What the proxy does to a request it faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer `503 Service Unavailable` (with `Connection: close`).
    Unavailable,
    /// Answer this status (with `Connection: close`), as a registry refusing the
    /// request would.
    Status(u16),
    /// Close the connection after reading the request head, answering nothing.
    Drop,
    /// Read the request and never answer, holding the connection open until the client
    /// closes it (for at most two minutes): a registry that hangs.
    Hang,
    /// Forward the request, relay only the first this many bytes of the answer (its
    /// head included), then close the connection: a download cut short.
    Cut(usize),
}

struct Rule {
    fault: Fault,
    /// Requests whose path contains this are faulted ("" matches all).
    path_contains: String,
    /// How many more matching requests to fault (`usize::MAX`: all of them).
    remaining: usize,
}

/// The link's shape: latency per request and a shared bandwidth limit.
#[derive(Default)]
struct Shape {
    delay: Duration,
    /// Each request waits 1 to 3 times `delay`, by its number (3, 1, 2, 3, 1, ...):
    /// answers come back out of order.
    out_of_order: bool,
    /// Bytes per second (0: unlimited).
    rate: u64,
    /// When the link is free again (the token bucket's clock).
    free_at: Option<std::time::Instant>,
}

struct State {
    upstream: String,
    rule: Mutex<Rule>,
    shape: Mutex<Shape>,
    requests: AtomicUsize,
    faulted: AtomicUsize,
    relayed: AtomicU64,
    /// Requests being served now, and the most at once.
    serving: AtomicUsize,
    most_serving: AtomicUsize,
    /// The last [`MAX_HEADS`] request heads seen, lowercased, as clients sent them.
    heads: Mutex<std::collections::VecDeque<String>>,
}

/// A running fault-injecting proxy; stopped when dropped.
pub struct FaultProxy {
    /// `127.0.0.1:PORT`, to use as the registry host in image references.
    pub addr: String,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`HOST:PORT`) that forwards every request until a
    /// rule is set with [`FaultProxy::fault`].
    ///
    /// # Panics
    /// When no loopback port can be bound.
    pub fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
        let addr = listener.local_addr().expect("its address").to_string();
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let state = Arc::new(State {
            upstream: upstream.to_string(),
            rule: Mutex::new(Rule {
                fault: Fault::Drop,
                path_contains: String::new(),
                remaining: 0,
            }),
            shape: Mutex::new(Shape::default()),
            requests: AtomicUsize::new(0),
            faulted: AtomicUsize::new(0),
            relayed: AtomicU64::new(0),
            serving: AtomicUsize::new(0),
            most_serving: AtomicUsize::new(0),
            heads: Mutex::new(std::collections::VecDeque::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let (state, stop) = (state.clone(), stop.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let state = state.clone();
                            thread::spawn(move || {
                                let _ = serve(conn, &state);
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(5))
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        FaultProxy {
            addr,
            state,
            stop,
            accept: Some(accept),
        }
    }

    /// From now on, applies `fault` to the next `count` requests whose path contains
    /// `path_contains` (`""` matches every request; `usize::MAX` faults all of them).
    /// `count` 0 turns faults off.
    pub fn fault(&self, fault: Fault, path_contains: &str, count: usize) {
        *self.state.rule.lock().unwrap() = Rule {
            fault,
            path_contains: path_contains.to_string(),
            remaining: count,
        };
    }

    /// Shapes forwarded requests from now on: each waits `delay` before it is
    /// forwarded, and answers share `bytes_per_second` (0: unlimited) over all
    /// connections.
    pub fn shape(&self, delay: Duration, bytes_per_second: u64) {
        *self.state.shape.lock().unwrap() = Shape {
            delay,
            out_of_order: false,
            rate: bytes_per_second,
            free_at: None,
        };
    }

    /// Like [`FaultProxy::shape`] with no bandwidth limit, but each request waits 3, 1
    /// or 2 times `delay` in turn: of requests sent at once, later ones are often
    /// answered first.
    pub fn shape_out_of_order(&self, delay: Duration) {
        *self.state.shape.lock().unwrap() = Shape {
            delay,
            out_of_order: true,
            rate: 0,
            free_at: None,
        };
    }

    /// The most requests the proxy was serving at once since the last call (or since
    /// it started).
    pub fn take_most_concurrent(&self) -> usize {
        let now = self.state.serving.load(Ordering::SeqCst);
        self.state.most_serving.swap(now, Ordering::SeqCst)
    }

    /// Requests seen so far (faulted or forwarded).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// The heads of the last [`MAX_HEADS`] requests seen whose request line (method,
    /// path, version) contains `path_contains`, lowercased, as the clients sent them
    /// (before `Connection: close` replaced their own `Connection`).
    pub fn heads(&self, path_contains: &str) -> Vec<String> {
        let needle = path_contains.to_lowercase();
        self.state
            .heads
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.lines().next().is_some_and(|l| l.contains(&needle)))
            .cloned()
            .collect()
    }

    /// Requests faulted so far.
    pub fn faulted(&self) -> usize {
        self.state.faulted.load(Ordering::SeqCst)
    }

    /// Bytes relayed from the upstream to clients so far (response heads included):
    /// what the origin served through the proxy.
    pub fn relayed_bytes(&self) -> u64 {
        self.state.relayed.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Reads up to the end of the request head (`\r\n\r\n`); returns the head and any body
/// bytes read with it, or `None` when the client closed first.
fn read_head(conn: &mut TcpStream) -> io::Result<Option<(Vec<u8>, Vec<u8>)>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            return Ok(Some((buf, rest)));
        }
        if buf.len() > 64 << 10 {
            return Err(io::Error::other("request head larger than 64 KiB"));
        }
        let n = conn.read(&mut chunk)?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The request head with any `Connection` header replaced by `Connection: close`.
fn close_after(head: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let mut out = String::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let is_connection = line
            .split_once(':')
            .is_some_and(|(k, _)| k.trim().eq_ignore_ascii_case("connection"));
        if !is_connection {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out.push_str("Connection: close\r\n\r\n");
    out.into_bytes()
}

/// A writer that adds what it writes to a counter as it goes, at most at the link's
/// rate.
struct Counted<'a, W> {
    inner: W,
    count: &'a AtomicU64,
    shape: &'a Mutex<Shape>,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // At most 16 KiB at a time, so that connections share the link finely.
        let buf = &buf[..buf.len().min(16 << 10)];
        let wait = {
            let mut s = self.shape.lock().unwrap();
            if s.rate == 0 {
                None
            } else {
                let now = std::time::Instant::now();
                let start = s.free_at.filter(|t| *t > now).unwrap_or(now);
                let done = start + Duration::from_secs_f64(buf.len() as f64 / s.rate as f64);
                s.free_at = Some(done);
                Some(done)
            }
        };
        if let Some(done) = wait {
            thread::sleep(done.saturating_duration_since(std::time::Instant::now()));
        }
        let n = self.inner.write(buf)?;
        self.count.fetch_add(n as u64, Ordering::SeqCst);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Counts a request being served while alive.
struct Serving<'a>(&'a State);

impl<'a> Serving<'a> {
    fn new(state: &'a State) -> Self {
        let now = state.serving.fetch_add(1, Ordering::SeqCst) + 1;
        state.most_serving.fetch_max(now, Ordering::SeqCst);
        Serving(state)
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.serving.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(mut client: TcpStream, state: &State) -> io::Result<()> {
    client.set_nonblocking(false)?;
    client.set_read_timeout(Some(Duration::from_secs(60)))?;
    let Some((head, rest)) = read_head(&mut client)? else {
        return Ok(());
    };
    let number = state.requests.fetch_add(1, Ordering::SeqCst);
    {
        let mut heads = state.heads.lock().unwrap();
        if heads.len() == MAX_HEADS {
            heads.pop_front();
        }
        heads.push_back(String::from_utf8_lossy(&head).to_lowercase());
    }
    let _serving = Serving::new(state);
    let path = String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let fault = {
        let mut rule = state.rule.lock().unwrap();
        if rule.remaining > 0 && path.contains(&rule.path_contains) {
            if rule.remaining != usize::MAX {
                rule.remaining -= 1;
            }
            Some(rule.fault)
        } else {
            None
        }
    };
    if fault == Some(Fault::Hang) {
        state.faulted.fetch_add(1, Ordering::SeqCst);
        client.set_read_timeout(Some(Duration::from_secs(120)))?;
        let _ = io::copy(&mut client, &mut io::sink());
        return Ok(());
    }
    let limit = match fault {
        Some(Fault::Cut(n)) => {
            state.faulted.fetch_add(1, Ordering::SeqCst);
            n as u64
        }
        _ => u64::MAX,
    };
    if let Some(fault @ (Fault::Unavailable | Fault::Status(_) | Fault::Drop)) = fault {
        state.faulted.fetch_add(1, Ordering::SeqCst);
        let status = match fault {
            Fault::Unavailable => Some(503),
            Fault::Status(code) => Some(code),
            _ => None,
        };
        if let Some(code) = status {
            let body = "fault injected by the test proxy\n";
            write!(
                client,
                "HTTP/1.1 {code} Fault\r\nContent-Type: text/plain\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            client.shutdown(Shutdown::Write)?;
            // Read what the client still sends (a request body) so that closing does
            // not reset the connection before it read the answer.
            client.set_read_timeout(Some(Duration::from_millis(500)))?;
            let _ = io::copy(&mut (&client).take(256 << 20), &mut io::sink());
        }
        return client.shutdown(Shutdown::Both);
    }
    let delay = {
        let shape = state.shape.lock().unwrap();
        if shape.out_of_order {
            shape.delay * [3, 1, 2][number % 3]
        } else {
            shape.delay
        }
    };
    if !delay.is_zero() {
        thread::sleep(delay);
    }
    let mut upstream = TcpStream::connect(&state.upstream)?;
    upstream.write_all(&close_after(&head))?;
    upstream.write_all(&rest)?;
    let requests = {
        let (mut from, mut to) = (client.try_clone()?, upstream.try_clone()?);
        thread::spawn(move || {
            let _ = io::copy(&mut from, &mut to);
        })
    };
    let mut counted = Counted {
        inner: &mut client,
        count: &state.relayed,
        shape: &state.shape,
    };
    let _ = io::copy(&mut (&upstream).take(limit), &mut counted);
    let _ = client.shutdown(Shutdown::Both);
    let _ = upstream.shutdown(Shutdown::Both);
    let _ = requests.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_header_is_replaced() {
        let head = b"GET /v2/ HTTP/1.1\r\nHost: x\r\nconnection: keep-alive\r\n\r\n";
        assert_eq!(
            close_after(head),
            b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
    }

    /// A one-shot upstream answering 200 to one request, then the proxy faulting the
    /// first request and forwarding the second.
    #[test]
    fn faults_then_forwards() {
        let up = TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = up.local_addr().unwrap().to_string();
        let server = thread::spawn(move || {
            let (mut c, _) = up.accept().unwrap();
            let (head, _) = read_head(&mut c).unwrap().unwrap();
            assert!(String::from_utf8_lossy(&head).contains("Connection: close"));
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
        });
        let proxy = FaultProxy::start(&up_addr);
        proxy.fault(Fault::Unavailable, "/v2/", 1);
        let get = || {
            let mut c = TcpStream::connect(&proxy.addr).unwrap();
            c.write_all(b"GET /v2/ HTTP/1.1\r\nHost: h\r\n\r\n")
                .unwrap();
            let mut s = String::new();
            let _ = c.read_to_string(&mut s);
            s
        };
        assert!(get().starts_with("HTTP/1.1 503"));
        let ok = get();
        assert!(ok.starts_with("HTTP/1.1 200") && ok.ends_with("ok"), "{ok}");
        server.join().unwrap();
        assert_eq!((proxy.requests(), proxy.faulted()), (2, 1));
    }

    #[test]
    fn cut_relays_only_the_first_bytes() {
        let up = TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = up.local_addr().unwrap().to_string();
        let server = thread::spawn(move || {
            let (mut c, _) = up.accept().unwrap();
            read_head(&mut c).unwrap().unwrap();
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789");
        });
        let proxy = FaultProxy::start(&up_addr);
        let head = "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        proxy.fault(Fault::Cut(head.len() + 4), "", 1);
        let mut c = TcpStream::connect(&proxy.addr).unwrap();
        c.write_all(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        let mut s = String::new();
        let _ = c.read_to_string(&mut s);
        assert_eq!(s, format!("{head}0123"));
        server.join().unwrap();
    }

    #[test]
    fn shaping_delays_requests_and_limits_bandwidth() {
        let up = TcpListener::bind("127.0.0.1:0").unwrap();
        let up_addr = up.local_addr().unwrap().to_string();
        let body = vec![7u8; 200_000];
        let server = {
            let body = body.clone();
            thread::spawn(move || {
                let (mut c, _) = up.accept().unwrap();
                read_head(&mut c).unwrap().unwrap();
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(&body);
            })
        };
        let proxy = FaultProxy::start(&up_addr);
        proxy.shape(Duration::from_millis(100), 1_000_000);
        let t = std::time::Instant::now();
        let mut c = TcpStream::connect(&proxy.addr).unwrap();
        c.write_all(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        let took = t.elapsed();
        server.join().unwrap();
        assert!(got.ends_with(&body));
        // 100 ms of delay plus 200 kB at 1 MB/s.
        assert!(took >= Duration::from_millis(290), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }
}
