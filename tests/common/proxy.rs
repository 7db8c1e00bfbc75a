//! A TCP proxy on loopback that drops connections at the worst moment, as a flaky network or a
//! load balancer does: the first `cuts` connections whose request carried more than `after`
//! bytes are closed when the server's answer arrives, so the client sent the whole request
//! (the server acted on it) and never hears back. After that it forwards faithfully.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

pub struct FaultyProxy {
    port: u16,
    stopped: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
}

impl FaultyProxy {
    pub fn start(upstream: u16, cuts: usize, after: usize) -> FaultyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stopped = Arc::new(AtomicBool::new(false));
        let cut_count = Arc::new(AtomicUsize::new(0));
        let (stop, counted) = (stopped.clone(), cut_count.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                // Request bytes since the last answer, shared by the two directions.
                let request = Arc::new(AtomicUsize::new(0));
                let (client2, server2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let up = request.clone();
                std::thread::spawn(move || {
                    pipe(client, server, |n| {
                        up.fetch_add(n, Ordering::SeqCst);
                        true
                    })
                });
                let counted = counted.clone();
                std::thread::spawn(move || {
                    pipe(server2, client2, |_| {
                        let big = request.swap(0, Ordering::SeqCst) > after;
                        let cut = big
                            && counted
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                                    (c < cuts).then_some(c + 1)
                                })
                                .is_ok();
                        !cut
                    })
                });
            }
        });
        FaultyProxy {
            port,
            stopped,
            cuts: cut_count,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Connections cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for FaultyProxy {
    fn drop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wake the accept loop
    }
}

/// Copies `from` to `to` while `forward(bytes read)` says so; then closes both.
fn pipe(mut from: TcpStream, mut to: TcpStream, mut forward: impl FnMut(usize) -> bool) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !forward(n) || to.write_all(&buffer[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
