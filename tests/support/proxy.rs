//! A TCP proxy on loopback that sits between two nodes and can kill every connection
//! through it on demand, or from a seeded schedule: kill connections, stall, split
//! writes at random byte boundaries, and refuse reconnects for a while.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Faults the proxy applies to the bytes it forwards.
#[derive(Clone, Copy, Debug)]
pub struct Chaos {
    pub seed: u64,
    /// Mean time between connection kills (`None`: only on demand).
    pub kill_every: Option<Duration>,
    /// Refuse new connections for this long after a kill.
    pub refuse_for: Duration,
    /// Probability a forwarded chunk is split into two writes at a random byte.
    pub split: f64,
    /// Probability a chunk is held back before forwarding (stall), and for how long.
    pub stall: f64,
    pub stall_for: Duration,
}

impl Chaos {
    pub fn none() -> Self {
        Chaos {
            seed: 0,
            kill_every: None,
            refuse_for: Duration::ZERO,
            split: 0.0,
            stall: 0.0,
            stall_for: Duration::ZERO,
        }
    }
}

/// Counters of what the proxy did.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub kills: AtomicU64,
    pub splits: AtomicU64,
    pub stalls: AtomicU64,
    pub bytes: AtomicU64,
}

/// A running proxy: `addr` forwards to the target.
pub struct Proxy {
    pub addr: SocketAddr,
    pub stats: Arc<ProxyStats>,
    generation: watch::Sender<u64>,
    refusing: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Proxy {
    pub async fn start(target: SocketAddr, chaos: Chaos) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (generation, gen_rx) = watch::channel(0u64);
        let stats = Arc::new(ProxyStats::default());
        let refusing = Arc::new(AtomicBool::new(false));
        let rng = Arc::new(Mutex::new(chaos.seed ^ 0x9E37_79B9_7F4A_7C15));
        let mut tasks = Vec::new();
        {
            let stats = stats.clone();
            let refusing = refusing.clone();
            let rng = rng.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let Ok((inbound, _)) = listener.accept().await else {
                        return;
                    };
                    if refusing.load(Ordering::SeqCst) {
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                        drop(inbound);
                        continue;
                    }
                    stats.accepted.fetch_add(1, Ordering::Relaxed);
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        continue;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    for (r, w) in [
                        (Box::new(ri) as Box<Read>, Box::new(wo) as Box<Write>),
                        (Box::new(ro), Box::new(wi)),
                    ] {
                        let mut gen = gen_rx.clone();
                        let start_gen = *gen.borrow();
                        let stats = stats.clone();
                        let rng = rng.clone();
                        tokio::spawn(async move {
                            tokio::select! {
                                _ = pump(r, w, chaos, stats, rng) => {}
                                _ = gen.wait_for(|g| *g != start_gen) => {}
                            }
                        });
                    }
                }
            }));
        }
        if let Some(every) = chaos.kill_every {
            let generation = generation.clone();
            let stats = stats.clone();
            let refusing = refusing.clone();
            let rng = rng.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let jitter = next(&rng) % (every.as_micros() as u64 + 1);
                    tokio::time::sleep(every / 2 + Duration::from_micros(jitter)).await;
                    kill(&generation, &stats);
                    if !chaos.refuse_for.is_zero() {
                        refusing.store(true, Ordering::SeqCst);
                        tokio::time::sleep(chaos.refuse_for).await;
                        refusing.store(false, Ordering::SeqCst);
                    }
                }
            }));
        }
        Proxy {
            addr,
            stats,
            generation,
            refusing,
            tasks,
        }
    }

    /// Kill every connection currently through the proxy.
    pub fn kill_all(&self) {
        kill(&self.generation, &self.stats);
    }

    /// Refuse (accept and close) new connections while `on`.
    pub fn refuse(&self, on: bool) {
        self.refusing.store(on, Ordering::SeqCst);
    }

    /// Stop injecting scheduled faults (kills keep their connections closed).
    pub fn calm(&mut self) {
        for t in self.tasks.drain(1..) {
            t.abort();
        }
        self.refusing.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.kill_all();
    }
}

type Read = dyn tokio::io::AsyncRead + Unpin + Send;
type Write = dyn tokio::io::AsyncWrite + Unpin + Send;

fn kill(generation: &watch::Sender<u64>, stats: &ProxyStats) {
    generation.send_modify(|g| *g += 1);
    stats.kills.fetch_add(1, Ordering::Relaxed);
}

fn next(rng: &Mutex<u64>) -> u64 {
    let mut s = rng.lock().unwrap();
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn chance(rng: &Mutex<u64>, p: f64) -> bool {
    p > 0.0 && ((next(rng) >> 11) as f64 / (1u64 << 53) as f64) < p
}

async fn pump(
    mut r: Box<Read>,
    mut w: Box<Write>,
    chaos: Chaos,
    stats: Arc<ProxyStats>,
    rng: Arc<Mutex<u64>>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
        if chance(&rng, chaos.stall) {
            stats.stalls.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(chaos.stall_for).await;
        }
        if n > 1 && chance(&rng, chaos.split) {
            stats.splits.fetch_add(1, Ordering::Relaxed);
            let at = 1 + (next(&rng) as usize % (n - 1));
            if w.write_all(&buf[..at]).await.is_err() {
                return;
            }
            let _ = w.flush().await;
            tokio::time::sleep(Duration::from_micros(200)).await;
            if w.write_all(&buf[at..n]).await.is_err() {
                return;
            }
        } else if w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
