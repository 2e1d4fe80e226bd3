//! The crate docs' layering claims, checked against the source: the sans-IO core
//! (`proto`, `retry`, `detector`) names no runtime, socket, file or clock outside its
//! unit tests; `wire` touches tokio only in its feature-gated `tokio_util` adapter.
//! The core calls no durable write of the dedup either: it only buffers records, and
//! its owner writes and fsyncs them (`Endpoint::persist_owed`, `Dedup::sync`).
//! (The dedup layer itself is not in that list: its durable log writes files, and
//! `Dedup::open` reads the clocks once as its time base; the crate docs say so.)

use std::path::{Path, PathBuf};

/// Forbidden in the core, with why.
const FORBIDDEN: &[(&str, &str)] = &[
    ("tokio", "an async runtime"),
    ("std::fs", "file IO"),
    ("File::", "file IO"),
    ("std::net", "sockets"),
    ("Instant::now", "a clock"),
    ("SystemTime", "the wall clock"),
    ("thread::sleep", "blocking"),
    ("thread::spawn", "threads"),
    // The durable dedup's IO is the owner's (`Endpoint::persist_owed`): the core only
    // buffers records.
    (".sync()", "a durable write or fsync"),
    (
        "dedup.complete(",
        "a durable write (the core uses `complete_unsynced`)",
    ),
];

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            rust_files(&entry.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

/// A file's code outside its `#[cfg(test)]` module (by this crate's convention the
/// last item of a file) and outside comments (doc examples may use anything).
fn production_code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn violations(paths: &[&str], allowed: &[(&str, &str)]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for p in paths {
        rust_files(&root.join(p), &mut files);
    }
    assert!(!files.is_empty(), "no sources under {paths:?}");
    let mut found = Vec::new();
    for f in &files {
        let code = production_code(f);
        let name = f.strip_prefix(root).unwrap().display().to_string();
        for (pat, what) in FORBIDDEN {
            if code.contains(pat) && !allowed.contains(&(name.as_str(), pat)) {
                found.push(format!("{name}: `{pat}` ({what})"));
            }
        }
    }
    found
}

#[test]
fn the_sans_io_core_names_no_runtime_socket_file_or_clock() {
    let v = violations(&["src/proto", "src/retry", "src/detector.rs"], &[]);
    assert!(
        v.is_empty(),
        "the core must stay sans-IO:\n{}",
        v.join("\n")
    );
}

#[test]
fn the_wire_codec_uses_tokio_only_in_its_feature_gated_adapter() {
    let v = violations(
        &["src/wire"],
        &[
            ("src/wire/framed.rs", "tokio"),
            ("src/wire/mod.rs", "tokio"),
        ],
    );
    assert!(v.is_empty(), "{}", v.join("\n"));
    let module =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/wire/mod.rs"))
            .unwrap();
    for line in module.lines().filter(|l| l.contains("tokio")) {
        assert!(
            line.contains("cfg(feature = \"tokio-util\")"),
            "src/wire/mod.rs names tokio outside the feature gate: {line}"
        );
    }
}

/// The check itself can fail: the node driver, which owns the runtime and the
/// clock, trips it.
#[test]
fn the_check_catches_a_runtime_in_the_driver() {
    let v = violations(&["src/node/driver.rs"], &[]);
    assert!(v.iter().any(|s| s.contains("tokio")), "{v:?}");
}

/// The driver is a thin shell (issue 10): its loop fits in 300 lines and names none
/// of the policy the sans-IO core (`proto::core`) owns — the failure detector's
/// health, the liveness schedule, handoff decisions, the drain-then-spool rule.
#[test]
fn the_driver_is_a_thin_shell_without_policy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let driver = std::fs::read_to_string(root.join("src/node/driver.rs")).unwrap();
    let lines = driver.lines().count();
    assert!(lines <= 300, "src/node/driver.rs has {lines} lines");
    let code = production_code(&root.join("src/node/driver.rs"));
    let policy = [
        "Health",
        "liveness",
        "down_for",
        "hand_off",
        "peer_down",
        "spool_all",
        "gave_up",
        "Event::Settled",
        "Event::GaveUp",
        "Event::Rejected",
    ];
    let found: Vec<&str> = policy.into_iter().filter(|p| code.contains(p)).collect();
    assert!(found.is_empty(), "policy in the driver: {found:?}");
}

/// The node's policy tokens for hint replay: pacing, the id floor of handed-off
/// messages, the replay tick, and reading or marking the store's hints.
const REPLAY_POLICY: &[&str] = &[
    "ReplayThrottle",
    "hint_settled",
    "REPLAY_TICK",
    ".next_batch(",
    ".mark_delivered(",
    ".mark_rejected(",
    ".expire(",
];

fn replay_policy_in(paths: &[&str]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for p in paths {
        rust_files(&root.join(p), &mut files);
    }
    let mut found = Vec::new();
    // The dead-letter queue keeps its letters in a store of the same format and reads
    // them back for the application: not hint replay.
    files.retain(|f| !f.ends_with("src/node/dead_letter.rs"));
    for f in &files {
        let code = production_code(f);
        for pat in REPLAY_POLICY {
            if code.contains(pat) {
                found.push(format!(
                    "{}: `{pat}`",
                    f.strip_prefix(root).unwrap().display()
                ));
            }
        }
    }
    found
}

/// Hint replay is core policy (issue 10): what is replayed when, its pacing and
/// concurrency, hint expiry and the id floor live in `proto/replay.rs`; the node only
/// opens the store and lends it (and the send windows) to the core. The check can
/// fail: the core's own file trips it.
#[test]
fn hint_replay_policy_lives_in_the_core_not_the_node() {
    let v = replay_policy_in(&["src/node"]);
    assert!(v.is_empty(), "replay policy in the node:\n{}", v.join("\n"));
    assert!(!replay_policy_in(&["src/proto/replay.rs"]).is_empty());
}
