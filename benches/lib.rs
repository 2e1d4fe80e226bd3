//! Nothing: this package holds only the criterion benchmarks of ackwire (the files next
//! to this one, listed in its `Cargo.toml`). Cargo needs a library or binary target in
//! every package; this is it.
