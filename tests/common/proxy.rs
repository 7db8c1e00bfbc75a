//! A TCP proxy on loopback that cuts some connections mid-request, as a flaky network or a
//! load balancer does: every `every`-th connection (the first included) is shut down once the
//! client has sent `after` bytes over it.

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
    pub fn start(upstream: u16, every: usize, after: usize) -> FaultyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stopped = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicUsize::new(0));
        let (stop, cut_count) = (stopped.clone(), cuts.clone());
        std::thread::spawn(move || {
            for (number, client) in listener.incoming().enumerate() {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let limit = (number % every == 0).then_some(after);
                let cuts = cut_count.clone();
                let (client2, server2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pipe(client, server, limit, &cuts));
                std::thread::spawn(move || pipe(server2, client2, None, &AtomicUsize::new(0)));
            }
        });
        FaultyProxy {
            port,
            stopped,
            cuts,
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

/// Copies `from` to `to` until either side closes, or cuts both after `limit` bytes.
fn pipe(mut from: TcpStream, mut to: TcpStream, limit: Option<usize>, cuts: &AtomicUsize) {
    let mut buffer = [0u8; 16 * 1024];
    let mut sent = 0usize;
    loop {
        let n = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if limit.is_some_and(|limit| sent + n > limit) {
            cuts.fetch_add(1, Ordering::SeqCst);
            break;
        }
        if to.write_all(&buffer[..n]).is_err() {
            break;
        }
        sent += n;
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
