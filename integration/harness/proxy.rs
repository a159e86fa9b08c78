//! A fault-injecting TCP proxy for the tests: it sits between walvault and a server (the S3 server
//! or PostgreSQL) on a free loopback port and, on a deterministic schedule drawn from a seed, breaks
//! some of the connections it carries: resets, canned HTTP 500 and 503 SlowDown answers, stalls in
//! the middle of an answer, black holes, slow answers and requests cut off part-way. Each
//! connection gets at most one fault; every fault that fired is counted for the test's summary.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

/// What the proxy does to one connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forwards the answer up to a byte offset, then resets both ends.
    Reset,
    /// Forwards the request up to a byte offset (a write cut off part-way), then resets. Of an
    /// HTTP request cut inside its head, nothing is forwarded (see [`WholeHeads`]).
    PartialWrite,
    /// Answers the first request with `500 InternalError` without forwarding it (HTTP only).
    ServerError,
    /// Answers the first request with `503 SlowDown` without forwarding it (HTTP only).
    SlowDown,
    /// Forwards the answer up to a byte offset, then sends nothing for the stall time.
    Stall,
    /// Takes the request and never answers, until the client gives up or the stall time ends.
    BlackHole,
    /// Forwards the first [`SLOW_STRETCH`] bytes of the answer in small pieces with pauses (slow,
    /// but within any sane timeout).
    SlowBody,
}

/// Every fault kind; HTTP-only ones included.
pub const ALL_FAULTS: &[Fault] = &[
    Fault::Reset,
    Fault::PartialWrite,
    Fault::ServerError,
    Fault::SlowDown,
    Fault::Stall,
    Fault::BlackHole,
    Fault::SlowBody,
];

/// The faults that make sense on a PostgreSQL connection (no HTTP answers).
pub const STREAM_FAULTS: &[Fault] = &[
    Fault::Reset,
    Fault::PartialWrite,
    Fault::Stall,
    Fault::BlackHole,
    Fault::SlowBody,
];

/// How a proxy chooses its faults.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub seed: u64,
    /// Out of 1000 connections, how many get a fault.
    pub per_mille: u64,
    pub faults: Vec<Fault>,
    /// Offsets (answer or request bytes) at which a fault strikes are drawn below this.
    pub max_offset: usize,
    /// How long a stall or black hole lasts: longer than the client's timeout.
    pub stall: Duration,
    /// The first this many connections pass untouched (e.g. a cluster's own setup).
    pub spare_first: usize,
}

/// Counts of what the proxy did.
#[derive(Default)]
struct Counters {
    connections: AtomicUsize,
    /// Faults that struck, by index in [`ALL_FAULTS`].
    fired: [AtomicUsize; 7],
}

struct Shared {
    upstream: String,
    schedule: Mutex<(Schedule, u64)>,
    enabled: AtomicBool,
    stopping: AtomicBool,
    counters: Counters,
}

pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
}

/// A summary of what one proxy did.
#[derive(Clone, Debug, Default)]
pub struct ProxyStats {
    pub connections: usize,
    pub fired: Vec<(Fault, usize)>,
}

impl ProxyStats {
    pub fn total_faults(&self) -> usize {
        self.fired.iter().map(|(_, n)| n).sum()
    }
}

impl std::fmt::Display for ProxyStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} connections, {} faults",
            self.connections,
            self.total_faults()
        )?;
        for (fault, n) in self.fired.iter().filter(|(_, n)| *n > 0) {
            write!(f, " {fault:?}={n}")?;
        }
        Ok(())
    }
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` (`host:port`).
    pub fn start(upstream: &str, schedule: Schedule) -> Proxy {
        let port = super::free_port();
        let listener = TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("proxy: bind 127.0.0.1:{port}: {e}"));
        let seed = schedule.seed | 1;
        let shared = Arc::new(Shared {
            upstream: upstream.to_string(),
            schedule: Mutex::new((schedule, seed)),
            enabled: AtomicBool::new(true),
            stopping: AtomicBool::new(false),
            counters: Counters::default(),
        });
        let accepting = Arc::clone(&shared);
        thread::spawn(move || {
            for client in listener.incoming() {
                if accepting.stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let shared = Arc::clone(&accepting);
                thread::spawn(move || serve(&shared, client));
            }
        });
        Proxy { port, shared }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, for an S3 endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Turns fault injection on or off (connections keep being forwarded).
    pub fn set_enabled(&self, on: bool) {
        self.shared.enabled.store(on, Ordering::Relaxed);
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.shared.counters;
        ProxyStats {
            connections: c.connections.load(Ordering::Relaxed),
            fired: ALL_FAULTS
                .iter()
                .zip(&c.fired)
                .map(|(f, n)| (*f, n.load(Ordering::Relaxed)))
                .collect(),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// The next number of the schedule's xorshift sequence.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The fault for the next connection and its byte offset, drawn in accept order.
fn draw(shared: &Shared) -> Option<(Fault, usize, Duration)> {
    let n = shared.counters.connections.fetch_add(1, Ordering::Relaxed);
    let mut guard = shared.schedule.lock().unwrap();
    let (schedule, state) = &mut *guard;
    let roll = next(state) % 1000;
    let pick = next(state);
    let offset = next(state) as usize % schedule.max_offset.max(1);
    let early = next(state).is_multiple_of(2);
    if n < schedule.spare_first
        || roll >= schedule.per_mille
        || schedule.faults.is_empty()
        || !shared.enabled.load(Ordering::Relaxed)
    {
        return None;
    }
    let fault = schedule.faults[pick as usize % schedule.faults.len()];
    // Requests and most answers are short (PUT bodies and GET answers aside): cut a request
    // off early, and strike half the answers within their first bytes, or many faults would
    // never strike at all.
    let offset = if fault == Fault::PartialWrite || early {
        offset % 512
    } else {
        offset
    };
    Some((fault, offset, schedule.stall))
}

fn fired(shared: &Shared, fault: Fault) {
    let i = ALL_FAULTS.iter().position(|f| *f == fault).unwrap();
    shared.counters.fired[i].fetch_add(1, Ordering::Relaxed);
}

/// Closes a socket with a RST rather than a FIN.
fn reset(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized, initialized linger value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    let _ = stream.shutdown(Shutdown::Both);
}

fn serve(shared: &Arc<Shared>, client: TcpStream) {
    let _ = client.set_nodelay(true);
    let plan = draw(shared);
    match plan {
        Some((fault @ (Fault::ServerError | Fault::SlowDown), _, _)) => {
            if answer_with_error(&client, fault).is_ok() {
                fired(shared, fault);
            }
            return;
        }
        Some((Fault::BlackHole, _, stall)) => {
            fired(shared, Fault::BlackHole);
            let _ = client.set_read_timeout(Some(stall));
            let mut sink = [0u8; 8192];
            let started = std::time::Instant::now();
            while started.elapsed() < stall {
                match (&client).read(&mut sink) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
            reset(&client);
            return;
        }
        _ => {}
    }
    let Ok(server) = TcpStream::connect(&shared.upstream) else {
        reset(&client);
        return;
    };
    let _ = server.set_nodelay(true);
    let (Ok(client2), Ok(server2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up_plan = plan.filter(|(f, _, _)| *f == Fault::PartialWrite);
    let down_plan = plan.filter(|(f, _, _)| *f != Fault::PartialWrite);
    let up_shared = Arc::clone(shared);
    let up = thread::spawn(move || pump(&up_shared, client2, server2, up_plan));
    pump(shared, server, client, down_plan);
    let _ = up.join();
}

/// How much of a connection's answer a slow-body fault slows down (to about 500 kB/s), so a
/// long-lived stream falls behind for a while rather than for ever.
const SLOW_STRETCH: usize = 256 * 1024;

/// Copies `from` to `to`, applying `plan` when its offset is reached; ends both sockets when
/// either side ends.
fn pump(shared: &Shared, from: TcpStream, to: TcpStream, plan: Option<(Fault, usize, Duration)>) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut sent = 0usize;
    let mut plan = plan;
    let mut heads: Option<WholeHeads> = None;
    loop {
        let n = match (&from).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        if let Some((Fault::PartialWrite, offset, _)) = plan {
            if sent == 0 && is_http_request(chunk) {
                heads = Some(WholeHeads::default());
            }
            if let Some(heads) = &mut heads {
                let cut = sent + n > offset;
                let take = if cut { offset - sent } else { n };
                let ready = heads.pass(&chunk[..take]);
                sent += take;
                if (&to).write_all(&ready).is_err() {
                    break;
                }
                if cut {
                    fired(shared, Fault::PartialWrite);
                    reset(&to);
                    reset(&from);
                    return;
                }
                continue;
            }
        }
        if let Some((fault, offset, stall)) = plan {
            if fault == Fault::SlowBody {
                if sent == 0 {
                    fired(shared, fault);
                }
                for piece in chunk.chunks(1024) {
                    thread::sleep(Duration::from_millis(2));
                    if (&to).write_all(piece).is_err() {
                        break;
                    }
                }
                sent += n;
                if sent >= SLOW_STRETCH {
                    plan = None;
                }
                continue;
            }
            if sent + n > offset {
                let head = offset - sent;
                let _ = (&to).write_all(&chunk[..head]);
                sent += head;
                chunk = &chunk[head..];
                fired(shared, fault);
                plan = None;
                match fault {
                    Fault::Stall => {
                        thread::sleep(stall);
                    }
                    _ => {
                        reset(&to);
                        reset(&from);
                        return;
                    }
                }
            }
        }
        if (&to).write_all(chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Whether a connection's first bytes are an HTTP request (S3), not PostgreSQL's protocol.
fn is_http_request(first: &[u8]) -> bool {
    ["GET ", "PUT ", "POST ", "HEAD ", "DELETE "]
        .iter()
        .any(|m| first.starts_with(m.as_bytes()))
}

/// Holds back each request head of an HTTP stream until it is whole, so that a request cut off
/// part-way loses its body or all of itself, as on a real network, where S3 refuses the rest.
/// Python's HTTP server (moto's) takes a head cut short for a whole request: without its
/// signature or Content-Length, an empty PUT that stores an empty object under the key, which
/// no S3 server would accept and which a retry then meets as "other content".
#[derive(Default)]
struct WholeHeads {
    held: Vec<u8>,
    /// Body bytes of the current request still to pass before the next head.
    body_left: u64,
}

impl WholeHeads {
    /// Takes the next bytes of the stream and returns those that may go on now.
    fn pass(&mut self, mut bytes: &[u8]) -> Vec<u8> {
        let mut ready = Vec::with_capacity(bytes.len());
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.body_left).unwrap_or(usize::MAX));
                ready.extend_from_slice(&bytes[..n]);
                self.body_left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            // Only the bytes up to a head's end join it; what follows is its body.
            let searched_from = self.held.len().saturating_sub(3);
            self.held.extend_from_slice(bytes);
            let Some(end) = self.held[searched_from..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map(|i| searched_from + i + 4)
            else {
                return ready;
            };
            let extra = self.held.len() - end;
            bytes = &bytes[bytes.len() - extra..];
            self.held.truncate(end);
            self.body_left = body_length(&self.held);
            ready.append(&mut self.held);
        }
        ready
    }
}

/// What [`body_length`] says of a chunked body: everything that follows may be its.
const CHUNKED: u64 = u64::MAX;

/// The body length a request head announces: its Content-Length, or [`CHUNKED`].
fn body_length(head: &[u8]) -> u64 {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    let mut length = 0;
    for line in head.lines() {
        if let Some(v) = line.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        if line.starts_with("transfer-encoding:") && line.contains("chunked") {
            return CHUNKED;
        }
    }
    length
}

/// Reads one HTTP request (head and body) and answers it with an S3 error, closing the
/// connection.
fn answer_with_error(client: &TcpStream, fault: Fault) -> io::Result<()> {
    let _ = client.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(client);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if line.trim_end().is_empty() && !head.is_empty() {
            break;
        }
        head.push_str(&line);
    }
    match body_length(head.as_bytes()) {
        CHUNKED => drain_chunked(&mut reader)?,
        len => {
            io::copy(&mut (&mut reader).take(len), &mut io::sink())?;
        }
    }
    let (status, code, message) = match fault {
        Fault::SlowDown => (
            "503 Slow Down",
            "SlowDown",
            "Please reduce your request rate.",
        ),
        _ => (
            "500 Internal Server Error",
            "InternalError",
            "We encountered an internal error. Please try again.",
        ),
    };
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code>\
         <Message>{message}</Message><RequestId>proxy</RequestId></Error>"
    );
    let mut out = client;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()?;
    let _ = client.shutdown(Shutdown::Both);
    Ok(())
}

/// Skips a chunked body, trailers included.
fn drain_chunked(reader: &mut impl BufRead) -> io::Result<()> {
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let size_hex = line.trim().split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad chunk size"))?;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let mut trailer = String::new();
                if reader.read_line(&mut trailer)? == 0 || trailer.trim().is_empty() {
                    return Ok(());
                }
            }
        }
        io::copy(&mut reader.take(size as u64 + 2), &mut io::sink())?;
    }
}
