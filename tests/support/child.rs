//! Child processes for crash tests.
//!
//! The integration-test binary re-executes itself running only one `#[ignore]`d entry
//! test, with [`ROLE_ENV`] naming the role to play. The parent reads the child's stdout
//! line by line (a reader thread per child), waits for marker lines with a timeout, and
//! kills the child with SIGKILL ([`std::process::Child::kill`] on unix). Children call
//! [`watchdog`] first: they exit when their stdin reaches EOF (the parent closed it or
//! died), and after a hard lifetime cap, so no orphan lingers. Dropping a [`ChildProc`]
//! kills and reaps its process. Must not know what the roles do.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Environment variable naming the role a re-executed child plays.
pub const ROLE_ENV: &str = "ACKWIRE_CHILD_ROLE";

/// A running child process and the stdout lines it has written so far.
#[derive(Debug)]
pub struct ChildProc {
    role: String,
    child: Child,
    stdin: Option<ChildStdin>,
    rx: mpsc::Receiver<String>,
    reader: Option<JoinHandle<()>>,
    /// Every stdout line received so far, in order.
    pub lines: Vec<String>,
    reaped: bool,
}

impl ChildProc {
    /// Re-execute this test binary running only the test `entry` (which must dispatch
    /// on [`ROLE_ENV`]) as `role`, with `envs` set.
    pub fn spawn(entry: &str, role: &str, envs: &[(&str, String)]) -> ChildProc {
        let mut cmd = Command::new(std::env::current_exe().expect("current_exe"));
        cmd.args([
            "--exact",
            entry,
            "--nocapture",
            "--ignored",
            "--test-threads=1",
        ])
        .env(ROLE_ENV, role)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn child");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // With --nocapture and one thread, libtest prints "test <name> ... "
                // without a newline before the test runs: our first line follows it.
                let line = match line.split_once(" ... ") {
                    Some((head, rest)) if head.starts_with("test ") => rest.to_string(),
                    _ => line,
                };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildProc {
            role: role.to_string(),
            stdin: child.stdin.take(),
            child,
            rx,
            reader: Some(reader),
            lines: Vec::new(),
            reaped: false,
        }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Wait up to `timeout` for a line starting with `prefix` (lines already received
    /// count); returns it, or `None` on timeout or if the child's stdout closed.
    pub fn wait_line(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let found = |lines: &[String]| lines.iter().find(|l| l.starts_with(prefix)).cloned();
        if let Some(l) = found(&self.lines) {
            return Some(l);
        }
        let give_up = Instant::now() + timeout;
        loop {
            let left = give_up.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.starts_with(prefix);
                    self.lines.push(line);
                    if hit {
                        return self.lines.last().cloned();
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Move every line received so far into [`ChildProc::lines`].
    pub fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.rx.try_recv() {
            self.lines.push(line);
        }
        &self.lines
    }

    /// SIGKILL the child, reap it, and collect every line it wrote.
    pub fn kill(&mut self) -> &[String] {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
            self.reaped = true;
        }
        self.join_reader();
        &self.lines
    }

    /// Close the child's stdin (its watchdog exits the process), wait up to `timeout`
    /// for it to exit, then SIGKILL it if it has not. Returns whether it exited by
    /// itself.
    pub fn finish(&mut self, timeout: Duration) -> bool {
        drop(self.stdin.take());
        let give_up = Instant::now() + timeout;
        let mut clean = false;
        while Instant::now() < give_up {
            if let Ok(Some(_)) = self.child.try_wait() {
                clean = true;
                self.reaped = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if !clean {
            eprintln!("{} child {} did not exit; killing it", self.role, self.id());
        }
        self.kill();
        clean
    }

    fn join_reader(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.drain();
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// In a child: exit the process when stdin reaches EOF (the parent is gone or done),
/// or after `max_life` at the latest.
pub fn watchdog(max_life: Duration) {
    std::thread::spawn(|| {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => std::process::exit(0),
                Ok(_) => {}
            }
        }
    });
    std::thread::spawn(move || {
        std::thread::sleep(max_life);
        eprintln!("child lifetime cap reached; exiting");
        std::process::exit(3);
    });
}

/// In a child: write one line to stdout and flush it (one locked write per line, so
/// lines from concurrent tasks never interleave).
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Small xorshift64 generator for kill timing (the crate's PRNG is crate-private).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value).
    pub fn new(seed: u64) -> Rng {
        let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        r.next();
        r
    }

    /// The next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform-ish in `lo..hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo).max(1))
    }
}

/// The seed of run `i`: `ACKWIRE_CRASH_SEED` if set (to replay a failure's kill
/// schedule), else derived from the clock.
pub fn seed(i: u64) -> u64 {
    let base = match std::env::var("ACKWIRE_CRASH_SEED") {
        Ok(s) => s.parse().expect("ACKWIRE_CRASH_SEED must be a u64"),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    base.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}
