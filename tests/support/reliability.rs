//! `reliability:` lines, the raw material of RELIABILITY.md (see
//! `scripts/reliability.sh`). A line is printed once a check has passed, so a failing
//! suite never reports what did not hold.

use std::collections::HashMap;
use std::sync::Mutex;

static CASES: Mutex<Option<HashMap<&'static str, u64>>> = Mutex::new(None);

/// Print a reliability line: `area | fault or bad input | runs | what held`.
pub fn report(area: &str, fault: &str, runs: &str, held: &str) {
    println!("reliability: {area} | {fault} | {runs} | {held}");
}

/// Count one passed case of a property test; print its line when the `total`-th case
/// has passed.
pub fn case_passed(key: &'static str, total: u64, line: impl FnOnce() -> (String, String, String)) {
    let mut guard = CASES.lock().unwrap_or_else(|e| e.into_inner());
    let n = guard
        .get_or_insert_with(HashMap::new)
        .entry(key)
        .or_insert(0);
    *n += 1;
    if *n == total {
        let (area, fault, held) = line();
        report(&area, &fault, &format!("{total} cases"), &held);
    }
}
