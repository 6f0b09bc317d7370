//! A tiny HTTP/1.1 server on 127.0.0.1 for download tests: fixed replies per path, one request
//! per connection, and a bounded life (it stops on drop, or by itself after [`MAX_LIFE`]).
//!
//! Shared by xtask's unit tests (through `#[path]`) and its integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How the server answers a path.
#[derive(Debug, Clone)]
pub enum Reply {
    /// 200 with this body and its Content-Length.
    Body(Arc<Vec<u8>>),
    /// This status and an empty body.
    Status(u16),
    /// Read the request, then say nothing until the server stops.
    Stall,
    /// Send the headers (with the full Content-Length) and the first `sent` bytes, then stall.
    StallAfter { body: Arc<Vec<u8>>, sent: usize },
}

/// A running server; stops when dropped.
#[derive(Debug)]
pub struct TestServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

/// No server thread lives longer than this, whatever the test does.
pub const MAX_LIFE: Duration = Duration::from_secs(60);

/// Longest request head the server reads.
const MAX_HEAD: usize = 16 * 1024;

impl TestServer {
    /// Serves `routes` (path, e.g. `/good/a.gz`, to reply); anything else is a 404.
    pub fn start(routes: Vec<(String, Reply)>) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let routes: Arc<HashMap<String, Reply>> = Arc::new(routes.into_iter().collect());
        let thread = {
            let (stop, requests) = (Arc::clone(&stop), Arc::clone(&requests));
            thread::spawn(move || accept_loop(&listener, &routes, &stop, &requests))
        };
        Ok(Self { addr, stop, requests, thread: Some(thread) })
    }

    /// Base URL for paths under `/prefix/`, usable as a mirror.
    pub fn url(&self, prefix: &str) -> String {
        format!("http://{}/{prefix}", self.addr)
    }

    /// Paths requested so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A loopback URL where nothing listens: connections are refused at once.
pub fn refused_url() -> io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    drop(listener);
    Ok(format!("http://{addr}/"))
}

fn accept_loop(
    listener: &TcpListener,
    routes: &Arc<HashMap<String, Reply>>,
    stop: &Arc<AtomicBool>,
    requests: &Arc<Mutex<Vec<String>>>,
) {
    let born = Instant::now();
    let mut handlers = Vec::new();
    while !stop.load(Ordering::SeqCst) && born.elapsed() < MAX_LIFE {
        match listener.accept() {
            Ok((stream, _)) => {
                let (routes, stop, requests) = (Arc::clone(routes), Arc::clone(stop), Arc::clone(requests));
                handlers.push(thread::spawn(move || {
                    let _ = handle(stream, &routes, &stop, &requests, born);
                }));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(_) => break,
        }
    }
    stop.store(true, Ordering::SeqCst);
    for handler in handlers {
        let _ = handler.join();
    }
}

fn handle(
    mut stream: TcpStream,
    routes: &HashMap<String, Reply>,
    stop: &AtomicBool,
    requests: &Mutex<Vec<String>>,
    born: Instant,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let path = read_request_path(&mut stream)?;
    if let Ok(mut r) = requests.lock() {
        r.push(path.clone());
    }
    let stall = || {
        while !stop.load(Ordering::SeqCst) && born.elapsed() < MAX_LIFE {
            thread::sleep(Duration::from_millis(10));
        }
    };
    match routes.get(&path) {
        Some(Reply::Body(body)) => {
            stream.write_all(head(200, body.len()).as_bytes())?;
            stream.write_all(body)?;
        }
        Some(Reply::Status(code)) => stream.write_all(head(*code, 0).as_bytes())?,
        Some(Reply::Stall) => stall(),
        Some(Reply::StallAfter { body, sent }) => {
            stream.write_all(head(200, body.len()).as_bytes())?;
            stream.write_all(body.get(..*sent).unwrap_or(body))?;
            stream.flush()?;
            stall();
        }
        None => stream.write_all(head(404, 0).as_bytes())?,
    }
    stream.flush()
}

fn head(code: u16, len: usize) -> String {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Whatever",
    };
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Length: {len}\r\n\
         Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    )
}

/// Reads the request head and returns the path of its request line.
fn read_request_path(stream: &mut TcpStream) -> io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > MAX_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request head too long"));
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.lines().next().and_then(|line| line.split_whitespace().nth(1));
    path.map(str::to_owned).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no path"))
}
