//! Shared helpers for the integration tests.
#![allow(unreachable_pub, dead_code)]

pub mod child;
pub mod pair;
pub mod pki;
pub mod ports;
pub mod proxy;
pub mod reliability;
pub mod sim;
pub mod strategies;
pub mod wait;
