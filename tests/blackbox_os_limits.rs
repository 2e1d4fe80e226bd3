//! Black-box tests of operating-system limits, against the public API over real TCP on
//! loopback with default settings: file descriptors run out (in a receiver, in a
//! sender while it dials and while it opens its durable files), memory with large
//! payloads and a slow receiver, and OS threads and descriptors after hundreds of
//! nodes built and dropped.
//!
//! A limit must apply to one process only, so every scenario runs in a child: this
//! test binary re-executes itself running only `os_child_entry` with `OS_CHILD_ROLE`
//! set, under `prlimit --nofile=N:N` where a descriptor limit is wanted (the test is
//! skipped with a message if `prlimit` is missing). A child takes its commands line by
//! line on stdin (`hog`: open `/dev/null` until the process is out of descriptors and
//! keep them; `free`: close them) and exits when stdin closes. The parent reads the
//! child's `/proc/PID/{fd,stat,status}` for descriptors, CPU time and RSS. Linux only.
//!
//! Found: nothing failed in this area when written. What held: a receiver out of
//! descriptors (hogged in-process, or 300 junk connections from five addresses)
//! keeps serving its connected peer, does not spin (under 1 % CPU; the accept loop
//! backs off 100 ms per failure) and accepts a peer that dialed meanwhile once
//! descriptors are back; a sender whose dials fail with EMFILE keeps every message
//! and delivers it later (at-least-once `Acked`, at-most-once `Sent` and arrived);
//! `build` out of descriptors fails with a typed error at whichever of the dedup log,
//! the listener and the hint store ran out, and a failed build gives back every
//! descriptor and its directories; a hint the store cannot create a segment for is
//! `HandoffRefused`, never `HandedOff`; hints replay with one descriptor left;
//! `shutdown` out of descriptors fails the messages it cannot spool with `Shutdown`
//! and reports `HandedOff` only for hints in the store; RSS with 256 KiB payloads
//! stays at the window (sender ≈ 1 GiB for `max_in_flight` 4 096) and about 1.3 ×
//! the stream credit (receiver), and the sender's stays there while it retransmits
//! to a SIGKILLed receiver for 6 s (all 5 000 acked after its restart); 200 node
//! pairs built and shut down or dropped leave no thread or descriptor behind.
//! The sender's case held too with its descriptors gone for 10 s. Not a defect, but
//! worth knowing (since changed: counted in `accept_failures` and warned at most every
//! 10 s): an accept failure was warned on every retry (10 a second while out
//! of descriptors) and counted nowhere in `TcpStats`.
//!
//! Linux only: it reads `/proc` and binds 127.0.0.2–6.

#![cfg(target_os = "linux")]

mod support;

/// The two tests that hold about 1 GiB per process run one at a time.
static MEM: std::sync::Mutex<()> = std::sync::Mutex::new(());

use ackwire::dedup::DurableDedup;
use ackwire::{
    ChannelId, ChannelOptions, Guarantee, HandoffConfig, Node, NodeConfig, NodeError, NodeId,
    Outcome, Receipt, SendError,
};
use bytes::Bytes;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use support::wait::{any_addr, wait_until, within};

const ROLE_ENV: &str = "OS_CHILD_ROLE";

// -------------------------------------------------------------------------------------
// Child processes
// -------------------------------------------------------------------------------------

/// A child process of this test binary, its stdin for commands and its stdout lines.
struct Kid {
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<String>,
    lines: Vec<String>,
}

fn prlimit_available() -> bool {
    Command::new("prlimit")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

impl Kid {
    /// Runs `role` in a child, under a descriptor limit of `nofile` if given.
    fn spawn(role: &str, nofile: Option<u32>, envs: &[(&str, String)]) -> Kid {
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(exe);
                c
            }
            None => Command::new(exe),
        };
        cmd.args([
            "--exact",
            "os_child_entry",
            "--nocapture",
            "--ignored",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn child");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let line = match line.split_once(" ... ") {
                    Some((head, rest)) if head.starts_with("test ") => rest.to_string(),
                    _ => line,
                };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // stderr: echoed, and kept (prefixed) so a test can count warnings.
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("  [child] {line}");
                if tx2.send(format!("STDERR {line}")).is_err() {
                    break;
                }
            }
        });
        Kid {
            stdin: child.stdin.take(),
            child,
            rx,
            lines: Vec::new(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn tell(&mut self, cmd: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{cmd}").expect("write to child");
        stdin.flush().unwrap();
    }

    fn drain(&mut self) {
        while let Ok(l) = self.rx.try_recv() {
            self.lines.push(l);
        }
    }

    /// The first line (received so far or within `secs`) starting with `prefix`,
    /// after index `from` of `lines`.
    fn wait_line_from(&mut self, from: usize, prefix: &str, secs: f64) -> String {
        let end = Instant::now() + Duration::from_secs_f64(secs);
        loop {
            if let Some(l) = self.lines[from.min(self.lines.len())..]
                .iter()
                .find(|l| l.starts_with(prefix))
            {
                return l.clone();
            }
            let left = end.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(l) => self.lines.push(l),
                Err(_) => panic!(
                    "child: no line `{prefix}` within {secs} s; its output:\n{}",
                    self.lines.join("\n")
                ),
            }
        }
    }

    fn wait_line(&mut self, prefix: &str, secs: f64) -> String {
        self.wait_line_from(0, prefix, secs)
    }

    /// Sends `cmd` and waits for the reply line starting with `reply`.
    fn command(&mut self, cmd: &str, reply: &str, secs: f64) -> String {
        self.drain();
        let from = self.lines.len();
        self.tell(cmd);
        self.wait_line_from(from, reply, secs)
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// User + system CPU time of the child, in clock ticks (100 per second).
    fn cpu_ticks(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        // Fields after the command: state is [0]; utime is field 14 → [11], stime [12].
        let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        get(11) + get(12)
    }

    fn rss_mib(&self) -> u64 {
        rss_of(&format!("/proc/{}/status", self.pid()))
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Closes stdin and waits for the exit status (killing after `secs`).
    fn finish(&mut self, secs: f64) -> Option<std::process::ExitStatus> {
        drop(self.stdin.take());
        let end = Instant::now() + Duration::from_secs_f64(secs);
        while Instant::now() < end {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.drain();
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.drain();
        None
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn rss_of(status: &str) -> u64 {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(0)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn self_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn self_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// In a child: descriptors held open to exhaust the process's limit.
#[derive(Default)]
struct Hog(Vec<std::fs::File>);

impl Hog {
    /// Opens `/dev/null` until the process is out of descriptors, then closes `keep`
    /// of them again (so exactly `keep` are free).
    fn fill(&mut self, keep: usize) -> usize {
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => self.0.push(f),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(24), "expected EMFILE, got {e}");
                    break;
                }
            }
        }
        for _ in 0..keep.min(self.0.len()) {
            self.0.pop();
        }
        self.0.len()
    }

    fn free(&mut self) {
        self.0.clear();
    }
}

/// In a child: stdin lines as a channel; the process exits when stdin closes.
fn stdin_commands() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(180));
        eprintln!("child lifetime cap reached; exiting");
        std::process::exit(3);
    });
    rx
}

fn env(k: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| panic!("child needs {k}"))
}

fn opts(ch: u32, g: Guarantee) -> ChannelOptions {
    ChannelOptions::new(ChannelId(ch), g)
}

/// A node that acks every raw message on `ch` and counts them (by the payload's first
/// 8 bytes, little-endian, into `seen` if given).
fn ack_all(node: &Node, ch: u32, count: Arc<AtomicU64>) {
    let mut rx = node.raw_receiver(ChannelId(ch), false).unwrap();
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            count.fetch_add(1, Ordering::Relaxed);
            d.ack();
        }
    });
}

fn payload(i: u64, len: usize) -> Bytes {
    // Every byte written: an untouched zeroed buffer would not count in the RSS.
    let mut v = vec![(i as u8) | 1; len.max(8)];
    v[..8].copy_from_slice(&i.to_le_bytes());
    Bytes::from(v)
}

async fn settle_all(receipts: Vec<Receipt>, secs: f64) -> Vec<Result<Outcome, SendError>> {
    let end = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
    let mut out = Vec::new();
    for (i, r) in receipts.into_iter().enumerate() {
        match tokio::time::timeout_at(end, r).await {
            Ok(x) => out.push(x),
            Err(_) => panic!("receipt {i} did not resolve within {secs} s"),
        }
    }
    out
}

/// Entry point of the child processes; a no-op in a normal test run.
#[test]
#[ignore = "child-process entry point, run by the tests of this file"]
fn os_child_entry() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match role.as_str() {
        "fd_receiver" => rt.block_on(child_fd_receiver()),
        "fd_sender" => rt.block_on(child_fd_sender()),
        "fd_stores" => rt.block_on(child_fd_stores()),
        "fd_replay" => rt.block_on(child_fd_replay()),
        "fd_spool" => rt.block_on(child_fd_spool()),
        "mem_receiver" => rt.block_on(child_mem_receiver()),
        "mem_sender" => rt.block_on(child_mem_sender()),
        "churn" => rt.block_on(child_churn()),
        other => panic!("unknown role {other}"),
    }
}

// -------------------------------------------------------------------------------------
// 1. A receiver out of descriptors
// -------------------------------------------------------------------------------------

async fn child_fd_receiver() {
    let mut cmds = stdin_commands();
    let addr: SocketAddr = env("OS_ADDR").parse().unwrap();
    let node = Node::builder(NodeId(2))
        .bind(addr)
        .allow_peer(NodeId(1))
        .allow_peer(NodeId(3))
        .build()
        .await
        .expect("receiver builds");
    let count = Arc::new(AtomicU64::new(0));
    ack_all(&node, 1, count.clone());
    say("READY");
    let mut hog = Hog::default();
    while let Some(cmd) = cmds.recv().await {
        match cmd.as_str() {
            "hog" => {
                let n = hog.fill(0);
                say(&format!("HOGGED {n}"));
            }
            "free" => {
                hog.free();
                say("FREED");
            }
            "count" => say(&format!("COUNT {}", count.load(Ordering::Relaxed))),
            "stats" => {
                let s = node.stats().await.unwrap();
                let t = s.tcp.unwrap();
                say(&format!(
                    "STATS opened={} closed={} hs_failed={} accept_failures={}",
                    t.connections_opened,
                    t.connections_closed,
                    t.handshakes_failed,
                    t.accept_failures
                ));
            }
            other => panic!("unknown command {other}"),
        }
    }
}

async fn sender_node(id: u64, peer: u64, addr: SocketAddr) -> Node {
    Node::builder(NodeId(id))
        .bind(any_addr())
        .peer(NodeId(peer), addr)
        .build()
        .await
        .expect("sender builds")
}

async fn send_n(node: &Node, peer: u64, ch: u32, from: u64, n: u64) -> Vec<Receipt> {
    let s = node
        .raw_sender(NodeId(peer), opts(ch, Guarantee::AtLeastOnce))
        .unwrap();
    let mut r = Vec::new();
    for i in from..from + n {
        r.push(s.send(payload(i, 64)).await.expect("send accepted"));
    }
    r
}

/// A receiver whose process runs out of descriptors: the peer already connected is
/// still served, the node neither dies nor spins, a peer that dials meanwhile waits,
/// and once descriptors are free it is accepted and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_out_of_descriptors_serves_its_peers_and_recovers() {
    if !prlimit_available() {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let addr = any_addr();
    let mut kid = Kid::spawn("fd_receiver", Some(256), &[("OS_ADDR", addr.to_string())]);
    kid.wait_line("READY", 20.0);

    // An established peer.
    let a = sender_node(1, 2, addr).await;
    let r = send_n(&a, 2, 1, 0, 100).await;
    for x in within(15.0, "first 100", settle_all(r, 15.0)).await {
        assert_eq!(x, Ok(Outcome::Acked));
    }

    let hogged = kid.command("hog", "HOGGED", 10.0);
    eprintln!("receiver: {hogged}, fds now {}", kid.fds());

    // A second peer dials while the receiver cannot accept.
    let c = sender_node(3, 2, addr).await;
    let rc = send_n(&c, 2, 1, 10_000, 50).await;

    // The established peer is still served.
    let cpu0 = kid.cpu_ticks();
    let t0 = Instant::now();
    let r = send_n(&a, 2, 1, 100, 200).await;
    for x in within(15.0, "200 while out of fds", settle_all(r, 15.0)).await {
        assert_eq!(x, Ok(Outcome::Acked), "the connected peer was not served");
    }
    // Out of descriptors for 3 s in all: the node must not spin.
    let left = Duration::from_secs(3).saturating_sub(t0.elapsed());
    tokio::time::sleep(left).await;
    let cpu = kid.cpu_ticks() - cpu0;
    let secs = t0.elapsed().as_secs_f64();
    assert!(kid.alive(), "the receiver process died out of descriptors");
    eprintln!("receiver CPU while out of fds: {cpu} ticks in {secs:.1} s");
    assert!(
        (cpu as f64) < 0.30 * 100.0 * secs,
        "the receiver spun while out of descriptors: {cpu} ticks of CPU in {secs:.1} s"
    );

    // The peer that dialed meanwhile got nothing through yet: the limit bit, and
    // the failed accepts are counted.
    assert_eq!(kid.command("count", "COUNT", 5.0), "COUNT 300");
    let stats = kid.command("stats", "STATS", 5.0);
    let failures: u64 = stats
        .rsplit("accept_failures=")
        .next()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no accept_failures in {stats:?}"));
    assert!(failures > 0, "accept failures not counted: {stats}");
    kid.command("free", "FREED", 10.0);
    // The peer that dialed meanwhile is accepted and served.
    for x in within(20.0, "late peer", settle_all(rc, 20.0)).await {
        assert_eq!(x, Ok(Outcome::Acked), "the peer that dialed meanwhile");
    }
    let count = kid.command("count", "COUNT", 5.0);
    assert_eq!(count, "COUNT 350", "messages the receiver got");
    a.shutdown().await;
    c.shutdown().await;
    kid.finish(10.0);
}

/// Junk connections held open by the test, from five loopback addresses (under the
/// per-address limit of 64 each), use up a receiver's 256 descriptors: the peer
/// already connected is still served, the node does not spin, and once the junk is
/// closed a peer that dialed meanwhile is accepted and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_connections_exhausting_a_receivers_descriptors_do_not_stop_it() {
    if !prlimit_available() {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let addr = any_addr();
    let mut kid = Kid::spawn("fd_receiver", Some(256), &[("OS_ADDR", addr.to_string())]);
    kid.wait_line("READY", 20.0);
    let a = sender_node(1, 2, addr).await;
    let r = send_n(&a, 2, 1, 0, 50).await;
    for x in within(15.0, "first 50", settle_all(r, 15.0)).await {
        assert_eq!(x, Ok(Outcome::Acked));
    }
    // 5 × 60 connections that never say anything.
    let mut junk = Vec::new();
    for host in 2..7u8 {
        for _ in 0..60 {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            sock.bind(SocketAddr::from(([127, 0, 0, host], 0))).unwrap();
            if let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(2), sock.connect(addr)).await
            {
                junk.push(s);
            }
        }
    }
    wait_until(5.0, "the receiver out of descriptors", || kid.fds() >= 255).await;
    eprintln!(
        "junk connections: {}, receiver fds {}",
        junk.len(),
        kid.fds()
    );
    let c = sender_node(3, 2, addr).await;
    let rc = send_n(&c, 2, 1, 10_000, 50).await;
    let cpu0 = kid.cpu_ticks();
    let t0 = Instant::now();
    let r = send_n(&a, 2, 1, 50, 200).await;
    for x in within(15.0, "200 under the junk", settle_all(r, 15.0)).await {
        assert_eq!(x, Ok(Outcome::Acked), "the connected peer was not served");
    }
    tokio::time::sleep(Duration::from_secs(3).saturating_sub(t0.elapsed())).await;
    let cpu = kid.cpu_ticks() - cpu0;
    let secs = t0.elapsed().as_secs_f64();
    eprintln!("receiver CPU under the junk: {cpu} ticks in {secs:.1} s");
    assert!(kid.alive(), "the receiver process died");
    assert!(
        (cpu as f64) < 0.30 * 100.0 * secs,
        "the receiver spun: {cpu} ticks of CPU in {secs:.1} s"
    );
    drop(junk);
    for x in within(20.0, "late peer", settle_all(rc, 20.0)).await {
        assert_eq!(x, Ok(Outcome::Acked), "the peer that dialed under the junk");
    }
    assert_eq!(kid.command("count", "COUNT", 5.0), "COUNT 300");
    // Its descriptors come back once the junk is gone.
    wait_until(10.0, "descriptors back", || kid.fds() < 40).await;
    a.shutdown().await;
    c.shutdown().await;
    kid.finish(10.0);
}

// -------------------------------------------------------------------------------------
// 2. A sender out of descriptors while it dials
// -------------------------------------------------------------------------------------

async fn child_fd_sender() {
    let mut cmds = stdin_commands();
    let addr: SocketAddr = env("OS_ADDR").parse().unwrap();
    let mut hog = Hog::default();
    // Out of descriptors, `build` fails with a typed error (it needs a socket).
    hog.fill(0);
    let res = Node::builder(NodeId(1)).bind(any_addr()).build().await;
    match res {
        Err(NodeError::Transport(e)) => say(&format!("BUILD-ERR {e}")),
        Err(e) => say(&format!("BUILD-OTHER {e:?}")),
        Ok(_) => say("BUILD-OK"),
    }
    hog.free();
    let node = Node::builder(NodeId(1))
        .bind(any_addr())
        .build()
        .await
        .expect("builds with descriptors");
    // Out of descriptors again, then the peer is added: every dial fails.
    let n = hog.fill(0);
    node.add_peer(NodeId(2), addr);
    let s = node
        .raw_sender(NodeId(2), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let amo = node
        .raw_sender(NodeId(2), opts(2, Guarantee::AtMostOnce))
        .unwrap();
    let mut receipts = Vec::new();
    let mut amo_receipts = Vec::new();
    for i in 0..50 {
        receipts.push(s.send(payload(i, 64)).await.expect("send accepted"));
        amo_receipts.push(amo.send(payload(i, 64)).await.expect("send accepted"));
    }
    say(&format!("SENT hogged={n}"));
    let cmd = cmds.recv().await.unwrap();
    assert_eq!(cmd, "free");
    hog.free();
    let out = settle_all(receipts, 25.0).await;
    let acked = out.iter().filter(|x| **x == Ok(Outcome::Acked)).count();
    for x in out.iter().filter(|x| **x != Ok(Outcome::Acked)).take(3) {
        say(&format!("NOT-ACKED {x:?}"));
    }
    let amo_out = settle_all(amo_receipts, 25.0).await;
    let sent = amo_out.iter().filter(|x| **x == Ok(Outcome::Sent)).count();
    for x in amo_out.iter().filter(|x| **x != Ok(Outcome::Sent)).take(3) {
        say(&format!("AMO-NOT-SENT {x:?}"));
    }
    let t = node.tcp_stats().unwrap();
    say(&format!(
        "DONE acked={acked} amo_sent={sent} connect_failures={}",
        t.connect_failures
    ));
    node.shutdown().await;
    while cmds.recv().await.is_some() {}
}

/// A sender out of descriptors: `build` fails with a typed error; a node whose dials
/// fail (out of descriptors) keeps its messages and delivers every one once
/// descriptors are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sender_out_of_descriptors_while_dialing_delivers_once_they_are_back() {
    if !prlimit_available() {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let count = Arc::new(AtomicU64::new(0));
    ack_all(&b, 1, count.clone());
    let amo_count = Arc::new(AtomicU64::new(0));
    ack_all(&b, 2, amo_count.clone());
    let addr = b.local_addr().unwrap();
    let mut kid = Kid::spawn("fd_sender", Some(256), &[("OS_ADDR", addr.to_string())]);
    let built = kid.wait_line("BUILD-", 20.0);
    assert!(
        built.starts_with("BUILD-ERR"),
        "build out of descriptors: {built}"
    );
    kid.wait_line("SENT", 20.0);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        count.load(Ordering::Relaxed),
        0,
        "delivered while out of fds?"
    );
    kid.tell("free");
    let done = kid.wait_line("DONE", 30.0);
    eprintln!("{done}");
    assert!(
        done.starts_with("DONE acked=50 "),
        "{done}; {:?}",
        kid.lines
    );
    wait_until(5.0, "50 received", || count.load(Ordering::Relaxed) >= 50).await;
    // At-most-once: each message reported sent arrived (a healthy link loses none);
    // one still waiting when the peer was held Down may fail with `PeerDown`.
    let amo_sent = field(&done, "amo_sent") as u64;
    wait_until(5.0, "every at-most-once message sent arrives", || {
        amo_count.load(Ordering::Relaxed) >= amo_sent
    })
    .await;
    for l in kid.lines.iter().filter(|l| l.starts_with("AMO-NOT-SENT")) {
        assert!(l.contains("PeerDown"), "{l}");
    }
    kid.finish(10.0);
    b.shutdown().await;
}

// -------------------------------------------------------------------------------------
// 3. Durable files opened out of descriptors
// -------------------------------------------------------------------------------------

async fn child_fd_stores() {
    let _cmds = stdin_commands();
    let dir = std::path::PathBuf::from(env("OS_DIR"));
    let target: SocketAddr = env("OS_ADDR").parse().unwrap();
    let cfg = || {
        let mut c = NodeConfig::default();
        c.dedup.durable = Some(DurableDedup::new(dir.join("dedup")));
        c.handoff = Some(HandoffConfig::new(dir.join("hints")));
        c.dead_letter_dir = Some(dir.join("dead"));
        c
    };
    let mut hog = Hog::default();
    // Builds with 0, 1, 2, … free descriptors: each one is Ok or a typed error, and a
    // failed build gives back everything it opened (descriptors, the directories).
    let mut built = None;
    for free in 0..40 {
        let before = {
            hog.fill(free);
            self_fds()
        };
        let res = Node::builder(NodeId(1))
            .bind(any_addr())
            .peer(NodeId(2), target)
            .config(cfg())
            .build()
            .await;
        match res {
            Ok(node) => {
                say(&format!("BUILD free={free} ok"));
                built = Some(node);
                break;
            }
            Err(e) => {
                // Give a failed build's background work a moment to let go.
                let t0 = Instant::now();
                while self_fds() > before && t0.elapsed() < Duration::from_secs(3) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let after = self_fds();
                say(&format!(
                    "BUILD free={free} err fds_before={before} fds_after={after} {e}"
                ));
                if matches!(e, NodeError::Failed(_)) {
                    say("UNTYPED");
                }
            }
        }
        hog.free();
    }
    hog.free();
    let Some(node) = built else {
        say("NEVER-BUILT");
        return;
    };
    // The target is not listening: at-least-once with a short deadline gives up and
    // hands off. Out of descriptors, the hint store cannot open its segment.
    let mut o = opts(1, Guarantee::AtLeastOnce);
    o.deadline = Some(Duration::from_millis(800));
    let s = node.raw_sender(NodeId(2), o).unwrap();
    let n = hog.fill(0);
    let mut r = Vec::new();
    for i in 0..20 {
        r.push((i, s.send(payload(i, 64)).await));
    }
    let mut stored = Vec::new();
    for (i, x) in r {
        let x = match x {
            Ok(rc) => rc.await,
            Err(e) => Err(e),
        };
        say(&format!("HOGGED-SEND {i} {x:?}"));
        if x == Ok(Outcome::HandedOff) {
            stored.push(i);
        }
    }
    hog.free();
    // With descriptors back, the same goes to the hint store.
    for i in 20..40 {
        let x = match s.send(payload(i, 64)).await {
            Ok(rc) => rc.await,
            Err(e) => Err(e),
        };
        say(&format!("FREE-SEND {i} {x:?}"));
        if x == Ok(Outcome::HandedOff) {
            stored.push(i);
        }
    }
    say(&format!(
        "STORED {} hogged={n}",
        stored
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    ));
    // Keep running so the hints replay when the parent starts the target.
    std::future::pending::<()>().await;
}

/// A node with durable dedup and hinted handoff built with too few descriptors: each
/// attempt is `Ok` or a typed error and a failed one leaks nothing (a later build on
/// the same directories succeeds); a hint the store could not write is a typed
/// refusal, and every message reported `HandedOff` reaches the target when it comes
/// up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_stores_opened_out_of_descriptors_fail_typed_and_lose_nothing() {
    if !prlimit_available() {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let target = any_addr();
    let mut kid = Kid::spawn(
        "fd_stores",
        Some(256),
        &[
            ("OS_DIR", dir.path().display().to_string()),
            ("OS_ADDR", target.to_string()),
        ],
    );
    let stored = kid.wait_line("STORED", 40.0);
    kid.drain();
    let builds: Vec<&String> = kid
        .lines
        .iter()
        .filter(|l| l.starts_with("BUILD"))
        .collect();
    for l in &builds {
        eprintln!("{l}");
    }
    assert!(
        !kid.lines
            .iter()
            .any(|l| l == "UNTYPED" || l == "NEVER-BUILT"),
        "{:?}",
        kid.lines
    );
    for l in &builds {
        if let Some(rest) = l.split_once("fds_before=") {
            let mut it = rest.1.split_whitespace();
            let before: usize = it.next().unwrap().parse().unwrap();
            let after: usize = it
                .next()
                .unwrap()
                .trim_start_matches("fds_after=")
                .parse()
                .unwrap();
            assert!(after <= before, "a failed build kept descriptors: {l}");
        }
    }
    for l in kid.lines.iter().filter(|l| l.contains("-SEND ")) {
        eprintln!("{l}");
        assert!(
            l.contains("HandedOff") || l.contains("HandoffRefused"),
            "neither handed off nor a typed refusal: {l}"
        );
    }
    let ids: Vec<u64> = stored
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(
        ids.iter().filter(|i| **i >= 20).count() == 20,
        "with descriptors back every message is handed off: {stored}"
    );
    // The target comes up: every handed-off message arrives.
    let b = Node::builder(NodeId(2))
        .bind(target)
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let got = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let mut rx = b.raw_receiver(ChannelId(1), false).unwrap();
    let g = got.clone();
    tokio::spawn(async move {
        while let Some(d) = rx.recv().await {
            let mut k = [0u8; 8];
            k.copy_from_slice(&d.message()[..8]);
            g.lock().unwrap().insert(u64::from_le_bytes(k));
            d.ack();
        }
    });
    let want: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
    wait_until(20.0, "every handed-off message replayed", || {
        want.is_subset(&got.lock().unwrap())
    })
    .await;
    kid.finish(5.0);
    b.shutdown().await;
}

async fn child_fd_replay() {
    let mut cmds = stdin_commands();
    let dir = std::path::PathBuf::from(env("OS_DIR"));
    let target: SocketAddr = env("OS_ADDR").parse().unwrap();
    let keep: usize = env("OS_KEEP").parse().unwrap();
    let mut cfg = NodeConfig::default();
    cfg.handoff = Some(HandoffConfig::new(dir.join("hints")));
    let node = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), target)
        .config(cfg)
        .build()
        .await
        .expect("builds");
    let mut o = opts(1, Guarantee::AtLeastOnce);
    o.deadline = Some(Duration::from_millis(800));
    let s = node.raw_sender(NodeId(2), o).unwrap();
    let mut r = Vec::new();
    for i in 0..30 {
        r.push(s.send(payload(i, 64)).await.expect("send accepted"));
    }
    let out = settle_all(r, 20.0).await;
    let handed = out.iter().filter(|x| **x == Ok(Outcome::HandedOff)).count();
    say(&format!("HANDED {handed}"));
    let mut hog = Hog::default();
    let n = hog.fill(keep);
    say(&format!("HOGGED {n}"));
    assert_eq!(cmds.recv().await.as_deref(), Some("free"));
    hog.free();
    say("FREED");
    while let Some(c) = cmds.recv().await {
        if c == "stats" {
            let st = node.stats().await.unwrap();
            say(&format!("STATS {:?}", st.hints));
        }
    }
}

/// Hints stored while the target was down are replayed when it comes back although
/// the sender is out of descriptors but the one its connection needs (the hint
/// store cannot write its cursor file): nothing is lost, and every hint arrives once
/// descriptors are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_replayed_by_a_sender_out_of_descriptors_all_arrive() {
    if !prlimit_available() {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    for keep in [1usize, 3] {
        let dir = tempfile::tempdir().unwrap();
        let target = any_addr();
        let mut kid = Kid::spawn(
            "fd_replay",
            Some(256),
            &[
                ("OS_DIR", dir.path().display().to_string()),
                ("OS_ADDR", target.to_string()),
                ("OS_KEEP", keep.to_string()),
            ],
        );
        assert_eq!(kid.wait_line("HANDED", 20.0), "HANDED 30");
        kid.wait_line("HOGGED", 10.0);
        let b = Node::builder(NodeId(2))
            .bind(target)
            .allow_peer(NodeId(1))
            .build()
            .await
            .unwrap();
        let got = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
        let mut rx = b.raw_receiver(ChannelId(1), false).unwrap();
        let g = got.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                let mut k = [0u8; 8];
                k.copy_from_slice(&d.message()[..8]);
                *g.lock()
                    .unwrap()
                    .entry(u64::from_le_bytes(k))
                    .or_insert(0u32) += 1;
                d.ack();
            }
        });
        tokio::time::sleep(Duration::from_secs(4)).await;
        let during = got.lock().unwrap().len();
        assert!(
            kid.alive(),
            "keep {keep}: the sender died out of descriptors"
        );
        kid.command("free", "FREED", 5.0);
        let all = wait_until_ok(20.0, || got.lock().unwrap().len() == 30).await;
        let stats = kid.command("stats", "STATS", 5.0);
        eprintln!("keep {keep}: {during} arrived out of descriptors; {stats}");
        assert!(
            all,
            "keep {keep}: hints lost: arrived {:?}; {stats}",
            got.lock().unwrap().keys().collect::<Vec<_>>()
        );
        kid.finish(5.0);
        b.shutdown().await;
    }
}

async fn wait_until_ok(secs: f64, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while !f() {
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

async fn child_fd_spool() {
    let _cmds = stdin_commands();
    let dir = std::path::PathBuf::from(env("OS_DIR"));
    let target: SocketAddr = env("OS_ADDR").parse().unwrap();
    let hog_it = env("OS_HOG") == "1";
    let cfg = || {
        let mut c = NodeConfig::default();
        c.handoff = Some(HandoffConfig::new(dir.join("hints")));
        c
    };
    let node = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), target)
        .config(cfg())
        .build()
        .await
        .expect("builds");
    let s = node
        .raw_sender(NodeId(2), opts(1, Guarantee::AtLeastOnce))
        .unwrap();
    let mut r = Vec::new();
    for i in 0..20 {
        r.push(s.send(payload(i, 64)).await.expect("send accepted"));
    }
    // The target holds them without acking.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut hog = Hog::default();
    if hog_it {
        hog.fill(0);
    }
    within(30.0, "shutdown out of descriptors", node.shutdown()).await;
    let out = settle_all(r, 10.0).await;
    hog.free();
    let handed = out.iter().filter(|x| **x == Ok(Outcome::HandedOff)).count();
    for x in &out {
        say(&format!("OUTCOME {x:?}"));
    }
    drop(node);
    // A new run on the same directory: what was reported handed off is in the store.
    let again = Node::builder(NodeId(1))
        .bind(any_addr())
        .config(cfg())
        .build()
        .await
        .expect("rebuilds");
    let st = again.stats().await.unwrap();
    let pending = st.hints.map(|h| h.pending).unwrap_or(0);
    say(&format!("SPOOL handed={handed} pending={pending}"));
    again.shutdown().await;
}

/// `Node::shutdown` with messages unacked by a target that holds them, while the
/// sender is out of descriptors (its hint store cannot create a segment): shutdown
/// returns, every receipt resolves, and a receipt says `HandedOff` only for a hint
/// the next run finds in its store. (Also run with descriptors, as the control.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_spool_out_of_descriptors_fails_receipts_it_cannot_store() {
    if !prlimit_available() {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    for hog in ["0", "1"] {
        let b = Node::builder(NodeId(2))
            .bind(any_addr())
            .allow_peer(NodeId(1))
            .build()
            .await
            .unwrap();
        let mut rx = b.raw_receiver(ChannelId(1), false).unwrap();
        let held = Arc::new(std::sync::Mutex::new(Vec::new()));
        let h = held.clone();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                h.lock().unwrap().push(d);
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let mut kid = Kid::spawn(
            "fd_spool",
            Some(256),
            &[
                ("OS_DIR", dir.path().display().to_string()),
                ("OS_ADDR", b.local_addr().unwrap().to_string()),
                ("OS_HOG", hog.to_string()),
            ],
        );
        let line = kid.wait_line("SPOOL", 60.0);
        kid.drain();
        for l in kid.lines.iter().filter(|l| l.starts_with("OUTCOME")) {
            eprintln!("hog {hog}: {l}");
        }
        eprintln!("hog {hog}: {line}");
        assert_eq!(
            field(&line, "handed"),
            field(&line, "pending"),
            "hog {hog}: receipts said HandedOff for hints not in the store"
        );
        if hog == "0" {
            assert_eq!(field(&line, "handed"), 20, "the control: {line}");
        }
        kid.finish(5.0);
        drop(held);
        b.shutdown().await;
    }
}

// -------------------------------------------------------------------------------------
// 4. Memory: large payloads to a slow receiver
// -------------------------------------------------------------------------------------

const MEM_PAYLOAD: usize = 256 << 10;

async fn child_mem_receiver() {
    let _cmds = stdin_commands();
    let addr: SocketAddr = env("OS_ADDR").parse().unwrap();
    let node = Node::builder(NodeId(2))
        .bind(addr)
        .allow_peer(NodeId(1))
        .build()
        .await
        .unwrap();
    let mut rx = node.raw_receiver(ChannelId(1), false).unwrap();
    let slow = std::env::var("OS_FAST").is_err();
    say("READY");
    let mut n = 0u64;
    while let Some(d) = rx.recv().await {
        // A slow handler: about 1 ms a message.
        if slow {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        d.ack();
        n += 1;
        if n.is_multiple_of(1000) {
            say(&format!("RECEIVED {n}"));
        }
    }
}

async fn child_mem_sender() {
    let _cmds = stdin_commands();
    let addr: SocketAddr = env("OS_ADDR").parse().unwrap();
    let n: u64 = env("OS_N").parse().unwrap();
    let g = match env("OS_G").as_str() {
        "AtMostOnce" => Guarantee::AtMostOnce,
        "EffectivelyOnce" => Guarantee::EffectivelyOnce,
        _ => Guarantee::AtLeastOnce,
    };
    let node = sender_node(1, 2, addr).await;
    let s = node.raw_sender(NodeId(2), opts(1, g)).unwrap();
    let mut receipts = Vec::new();
    for i in 0..n {
        // A buffer of its own per message, as an application's would be.
        let p = payload(i, MEM_PAYLOAD);
        // With the default `fail_fast_when_down`, a send waiting on the full window
        // fails with `PeerDown` once the detector holds a killed receiver Down (how
        // soon within its 6 s away depends on the machine): the application tries
        // that message again, as one would.
        let receipt = loop {
            match s.send(p.clone()).await {
                Ok(r) => break r,
                Err(SendError::PeerDown { .. }) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("send refused: {e:?}"),
            }
        };
        receipts.push(receipt);
    }
    say("ALL-SENT");
    let out = settle_all(receipts, 60.0).await;
    let acked = out
        .iter()
        .filter(|x| matches!(x, Ok(Outcome::Acked | Outcome::Sent)))
        .count();
    say(&format!("DONE acked={acked}"));
    node.shutdown().await;
}

/// 5 000 messages of 256 KiB (1.25 GiB) to a handler that takes about 1 ms each, with
/// default settings, at-least-once and at-most-once: the sender's in-flight window
/// (`max_in_flight` 4 096) and the receiver's stream credit (4 096) are the documented
/// bounds, 1 GiB each here. The resident set of each process stays under 1.5 × that
/// plus 150 MiB (no second copy of every payload, no unbounded queue), and every
/// message is acked (at-most-once: sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_to_a_slow_receiver_keep_both_processes_bounded() {
    const N: u64 = 5000;
    let _one_at_a_time = MEM.lock().unwrap_or_else(|e| e.into_inner());
    for g in ["AtLeastOnce", "AtMostOnce"] {
        let addr = any_addr();
        let mut rk = Kid::spawn("mem_receiver", None, &[("OS_ADDR", addr.to_string())]);
        rk.wait_line("READY", 20.0);
        let mut sk = Kid::spawn(
            "mem_sender",
            None,
            &[
                ("OS_ADDR", addr.to_string()),
                ("OS_N", N.to_string()),
                ("OS_G", g.to_string()),
            ],
        );
        let (mut peak_s, mut peak_r) = (0u64, 0u64);
        let t0 = Instant::now();
        let mut next_print = Duration::ZERO;
        loop {
            peak_s = peak_s.max(sk.rss_mib());
            peak_r = peak_r.max(rk.rss_mib());
            if t0.elapsed() >= next_print {
                eprintln!(
                    "{g} {:4.1} s: sender {} MiB, receiver {} MiB",
                    t0.elapsed().as_secs_f64(),
                    sk.rss_mib(),
                    rk.rss_mib(),
                );
                next_print += Duration::from_secs(2);
            }
            sk.drain();
            if sk.lines.iter().any(|l| l.starts_with("DONE")) || !sk.alive() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "{g}: no DONE in 120 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let done = sk.wait_line("DONE", 1.0);
        eprintln!(
            "{g}: {done} in {:.1} s; peak RSS sender {peak_s} MiB, receiver {peak_r} MiB",
            t0.elapsed().as_secs_f64()
        );
        assert_eq!(done, format!("DONE acked={N}"), "{g}");
        let window_mib = (4096 * MEM_PAYLOAD as u64) >> 20;
        let bound = window_mib * 3 / 2 + 150;
        assert!(
            peak_s <= bound,
            "{g}: sender RSS {peak_s} MiB > {bound} MiB"
        );
        assert!(
            peak_r <= bound,
            "{g}: receiver RSS {peak_r} MiB > {bound} MiB"
        );
        sk.finish(5.0);
        rk.finish(5.0);
    }
}

/// The same 5 000 × 256 KiB at-least-once, and the slow receiver's process is
/// SIGKILLed 3 s in and restarted (with a fast handler) on its address 6 s later:
/// while the sender retransmits into nothing its RSS stays at its window (1.5 × 1 GiB
/// + 150 MiB), and every message is acked once the receiver is back (a send refused
/// with `PeerDown` while the receiver is held Down is tried again by the sender).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_to_a_killed_receiver_keep_the_sender_bounded() {
    const N: u64 = 5000;
    let _one_at_a_time = MEM.lock().unwrap_or_else(|e| e.into_inner());
    let addr = any_addr();
    let mut rk = Kid::spawn("mem_receiver", None, &[("OS_ADDR", addr.to_string())]);
    rk.wait_line("READY", 20.0);
    let mut sk = Kid::spawn(
        "mem_sender",
        None,
        &[
            ("OS_ADDR", addr.to_string()),
            ("OS_N", N.to_string()),
            ("OS_G", "AtLeastOnce".to_string()),
        ],
    );
    let t0 = Instant::now();
    let mut peak = 0u64;
    let mut restarted = false;
    loop {
        peak = peak.max(sk.rss_mib());
        let at = t0.elapsed();
        if at >= Duration::from_secs(3) && rk.alive() && !restarted {
            let _ = rk.child.kill();
            let _ = rk.child.wait();
            eprintln!("receiver killed; sender RSS {} MiB", sk.rss_mib());
        }
        if at >= Duration::from_secs(9) && !restarted {
            eprintln!("receiver restarted; sender peak RSS {peak} MiB so far");
            rk = Kid::spawn(
                "mem_receiver",
                None,
                &[("OS_ADDR", addr.to_string()), ("OS_FAST", "1".into())],
            );
            rk.wait_line("READY", 20.0);
            restarted = true;
        }
        sk.drain();
        if sk.lines.iter().any(|l| l.starts_with("DONE")) || !sk.alive() {
            break;
        }
        assert!(at < Duration::from_secs(120), "no DONE in 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let done = sk.wait_line("DONE", 1.0);
    eprintln!(
        "{done} in {:.1} s; sender peak RSS {peak} MiB",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(done, format!("DONE acked={N}"));
    let bound = ((4096 * MEM_PAYLOAD as u64) >> 20) * 3 / 2 + 150;
    assert!(peak <= bound, "sender RSS {peak} MiB > {bound} MiB");
    sk.finish(5.0);
    rk.finish(5.0);
}

// -------------------------------------------------------------------------------------
// 5. Threads and descriptors after hundreds of nodes
// -------------------------------------------------------------------------------------

async fn churn_cycle(i: u64, dir: &std::path::Path) {
    let durable = i % 4 == 3;
    let cfg = |name: &str| {
        let mut c = NodeConfig::default();
        if durable {
            c.dedup.durable = Some(DurableDedup::new(dir.join(format!("{name}-dedup"))));
            c.handoff = Some(HandoffConfig::new(dir.join(format!("{name}-hints"))));
        }
        c
    };
    let b = Node::builder(NodeId(2))
        .bind(any_addr())
        .allow_peer(NodeId(1))
        .config(cfg("b"))
        .build()
        .await
        .expect("b builds");
    let count = Arc::new(AtomicU64::new(0));
    ack_all(&b, 1, count.clone());
    let a = Node::builder(NodeId(1))
        .bind(any_addr())
        .peer(NodeId(2), b.local_addr().unwrap())
        .config(cfg("a"))
        .build()
        .await
        .expect("a builds");
    let s = a
        .raw_sender(NodeId(2), opts(1, Guarantee::EffectivelyOnce))
        .unwrap();
    let r = s.send(payload(i, 16)).await.unwrap();
    assert_eq!(within(10.0, "churn message", r).await, Ok(Outcome::Acked));
    // Half shut down cleanly, half dropped.
    if i.is_multiple_of(2) {
        a.shutdown().await;
        b.shutdown().await;
    } else {
        drop(a);
        drop(b);
    }
}

async fn child_churn() {
    let _cmds = stdin_commands();
    let dir = tempfile::tempdir().unwrap();
    for i in 0..8 {
        churn_cycle(i, dir.path()).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (fd0, th0) = (self_fds(), self_threads());
    say(&format!("BASE fds={fd0} threads={th0}"));
    let mut peak_th = th0;
    for i in 8..208 {
        churn_cycle(i, dir.path()).await;
        peak_th = peak_th.max(self_threads());
        if i % 50 == 0 {
            say(&format!(
                "CYCLE {i} fds={} threads={}",
                self_fds(),
                self_threads()
            ));
        }
    }
    // Dropped nodes' tasks end in the background, and the runtime's extra threads
    // (blocking fsyncs) only after tokio's 10 s keep-alive: give them that.
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end && (self_fds() > fd0 + 2 || self_threads() > th0 + 2) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    say(&format!(
        "END fds={} threads={} peak_threads={peak_th}",
        self_fds(),
        self_threads()
    ));
}

fn field(line: &str, name: &str) -> usize {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {line}"))
}

/// 200 pairs of nodes built, used and shut down or dropped (a quarter with durable
/// dedup and a hint store) in one process: its OS threads and descriptors come back
/// to what they were after the first few.
#[test]
fn hundreds_of_nodes_built_and_dropped_leave_no_threads_or_descriptors() {
    let mut kid = Kid::spawn("churn", None, &[]);
    let base = kid.wait_line("BASE", 30.0);
    let end = kid.wait_line("END", 150.0);
    kid.drain();
    for l in kid.lines.iter().filter(|l| l.starts_with("CYCLE")) {
        eprintln!("{l}");
    }
    eprintln!("{base}\n{end}");
    let (fd0, th0) = (field(&base, "fds"), field(&base, "threads"));
    let (fd1, th1) = (field(&end, "fds"), field(&end, "threads"));
    assert!(fd1 <= fd0 + 2, "descriptors left behind: {base} -> {end}");
    assert!(th1 <= th0 + 2, "threads left behind: {base} -> {end}");
    assert!(
        field(&end, "peak_threads") <= th0 + 16,
        "threads grew during the churn: {end}"
    );
    kid.finish(5.0);
}
