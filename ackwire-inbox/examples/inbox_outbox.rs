//! Placeholder: the order and ledger example.
fn main() {}
