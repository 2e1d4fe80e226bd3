//! How the configuration types read and write themselves with serde (TOML, JSON, …).
//!
//! Owns the text forms that the derived `Serialize`/`Deserialize` impls of the config
//! types refer to with `#[serde(with = …)]`: human-readable durations, the
//! authorization's channel list, and the node-level defaults that differ from a
//! nested type's own `Default`. It must not hold configuration logic (defaults live on
//! the types, validation in their `validate`).
//!
//! # Durations
//!
//! A duration is a string of one or more `<number><unit>` terms, optionally separated
//! by spaces: `"200ms"`, `"5s"`, `"1.5s"`, `"24h"`, `"1h 30m"`. Units: `ns`, `us` (or
//! `µs`), `ms`, `s`, `m` (or `min`), `h`, `d`. `"0"` is zero and `"never"` is
//! `Duration::MAX` (a deadline or drain that never fires). An optional duration (a
//! retry deadline) also takes `"none"`, as does a delivery limit
//! (`ReceiverOptions::max_deliveries = "none"`: no limit). Written durations use the same form
//! (`Duration::from_millis(1500)` is written `"1s500ms"`), so every value round-trips
//! exactly.
//!
//! # Nested defaults
//!
//! Every config struct is `#[serde(default)]`: a file names only what it changes. A
//! nested table fills its missing fields from the *enclosing* type's default, not the
//! nested type's own: `[dedup] horizon = "5m"` in a node config keeps the node's
//! `dedup.window` and every other node-level dedup default, and
//! `[proto.retry_budget] ttl = "20s"` keeps `ProtoConfig`'s `retry_ratio` of 1.0.

use crate::dedup::DedupConfig;
use crate::id::{ChannelId, NodeId};
use crate::retry::RetryBudgetConfig;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

/// `#[serde(with = "crate::config_serde::duration")]` for a `Duration` field.
pub(crate) mod duration {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_duration(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_str(DurationVisitor)
    }
}

/// `#[serde(with = "crate::config_serde::option_duration")]` for an
/// `Option<Duration>` field: `None` is written `"none"`.
pub(crate) mod option_duration {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.collect_str(&format_duration(*d)),
            None => s.serialize_str("none"),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<Duration>, D::Error> {
        d.deserialize_any(OptionDurationVisitor)
    }
}

/// `#[serde(with = "crate::config_serde::option_limit")]` for an `Option<u32>` limit
/// whose default is `Some`: `None` (no limit) is written `"none"`, since TOML has no
/// null and an omitted field means the default. (Regression: `None` was written as
/// nothing and read back as the default limit.)
pub(crate) mod option_limit {
    use super::*;

    pub(crate) fn serialize<S: Serializer>(v: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_u32(*n),
            None => s.serialize_str("none"),
        }
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        d.deserialize_any(OptionLimitVisitor)
    }

    struct OptionLimitVisitor;

    impl<'de> Visitor<'de> for OptionLimitVisitor {
        type Value = Option<u32>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "a non-negative integer, or \"none\" for no limit")
        }

        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Option<u32>, E> {
            u32::try_from(n)
                .map(Some)
                .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(n), &self))
        }

        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Option<u32>, E> {
            u32::try_from(n)
                .map(Some)
                .map_err(|_| E::invalid_value(de::Unexpected::Signed(n), &self))
        }

        fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<u32>, E> {
            if s.trim() == "none" {
                Ok(None)
            } else {
                Err(E::invalid_value(de::Unexpected::Str(s), &self))
            }
        }

        fn visit_none<E: de::Error>(self) -> Result<Option<u32>, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Option<u32>, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<u32>, D::Error> {
            d.deserialize_any(self)
        }
    }
}

/// `Authorization`'s per-channel sender lists, written as a list of
/// `{ channel = 1, senders = [2, 3] }` tables (TOML keys cannot be integers).
pub(crate) mod channel_senders {
    use super::*;

    #[derive(Serialize, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Entry {
        channel: ChannelId,
        senders: BTreeSet<NodeId>,
    }

    pub(crate) fn serialize<S: Serializer>(
        map: &HashMap<ChannelId, BTreeSet<NodeId>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut entries: Vec<Entry> = map
            .iter()
            .map(|(channel, senders)| Entry {
                channel: *channel,
                senders: senders.clone(),
            })
            .collect();
        entries.sort_by_key(|e| e.channel);
        entries.serialize(s)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<HashMap<ChannelId, BTreeSet<NodeId>>, D::Error> {
        let entries = Vec::<Entry>::deserialize(d)?;
        let mut map = HashMap::with_capacity(entries.len());
        for e in entries {
            if map.insert(e.channel, e.senders).is_some() {
                return Err(de::Error::custom(format_args!(
                    "channel {} is listed twice",
                    e.channel.0
                )));
            }
        }
        Ok(map)
    }
}

/// `NodeConfig::dedup`: missing fields come from `NodeConfig::default().dedup`.
pub(crate) fn node_dedup<'de, D: Deserializer<'de>>(d: D) -> Result<DedupConfig, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Patch {
        window: Option<u32>,
        max_streams: Option<usize>,
        max_streams_per_node: Option<usize>,
        table_capacity: Option<usize>,
        table_budget_bytes: Option<usize>,
        #[serde(default, with = "option_duration")]
        horizon: Option<Duration>,
        #[serde(default, with = "option_duration")]
        retention: Option<Duration>,
        durable: Option<crate::dedup::DurableDedup>,
    }
    let p = Patch::deserialize(d)?;
    let mut c = crate::NodeConfig::default().dedup;
    overlay(&mut c.window, p.window);
    overlay(&mut c.max_streams, p.max_streams);
    overlay(&mut c.max_streams_per_node, p.max_streams_per_node);
    overlay(&mut c.table_capacity, p.table_capacity);
    overlay(&mut c.table_budget_bytes, p.table_budget_bytes);
    overlay(&mut c.horizon, p.horizon);
    overlay(&mut c.retention, p.retention);
    if p.durable.is_some() {
        c.durable = p.durable;
    }
    Ok(c)
}

/// `ProtoConfig::retry_budget`: missing fields come from
/// `ProtoConfig::default().retry_budget`.
pub(crate) fn proto_retry_budget<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<RetryBudgetConfig, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Patch {
        #[serde(default, with = "option_duration")]
        ttl: Option<Duration>,
        min_retries_per_sec: Option<u32>,
        retry_ratio: Option<f64>,
    }
    let p = Patch::deserialize(d)?;
    let mut c = crate::ProtoConfig::default().retry_budget;
    overlay(&mut c.ttl, p.ttl);
    overlay(&mut c.min_retries_per_sec, p.min_retries_per_sec);
    overlay(&mut c.retry_ratio, p.retry_ratio);
    Ok(c)
}

/// The defaults a `[handoff]` table starts from: `HandoffConfig::new(".")` (hints
/// under `./hints/`, as `HintStoreConfig::default`).
pub(crate) fn handoff_defaults() -> crate::HandoffConfig {
    crate::HandoffConfig::new(".")
}

/// The defaults a `durable` dedup table starts from: `DurableDedup::new(".")`.
pub(crate) fn durable_dedup_defaults() -> crate::dedup::DurableDedup {
    crate::dedup::DurableDedup::new(".")
}

fn overlay<T>(field: &mut T, value: Option<T>) {
    if let Some(v) = value {
        *field = v;
    }
}

const EXPECTED: &str = "a duration such as \"200ms\", \"5s\", \"1h 30m\" or \"never\"";

struct DurationVisitor;

impl Visitor<'_> for DurationVisitor {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(EXPECTED)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
        parse_duration(s).map_err(|why| {
            E::custom(format_args!(
                "invalid duration {s:?}: {why} (expected {EXPECTED})"
            ))
        })
    }
}

struct OptionDurationVisitor;

impl<'de> Visitor<'de> for OptionDurationVisitor {
    type Value = Option<Duration>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{EXPECTED}, or \"none\"")
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Option<Duration>, E> {
        if s.trim() == "none" {
            return Ok(None);
        }
        DurationVisitor.visit_str(s).map(Some)
    }

    fn visit_none<E: de::Error>(self) -> Result<Option<Duration>, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Option<Duration>, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Option<Duration>, D::Error> {
        d.deserialize_str(DurationVisitor).map(Some)
    }
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Units from largest to smallest, in nanoseconds; the first name of each is the one
/// written.
const UNITS: &[(&[&str], u128)] = &[
    (&["d"], 86_400 * NANOS_PER_SEC),
    (&["h"], 3_600 * NANOS_PER_SEC),
    (&["m", "min"], 60 * NANOS_PER_SEC),
    (&["s"], NANOS_PER_SEC),
    (&["ms"], 1_000_000),
    (&["us", "µs"], 1_000),
    (&["ns"], 1),
];

/// Parses the duration grammar of the module doc.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    match s {
        "" => return Err("empty".into()),
        "0" => return Ok(Duration::ZERO),
        "never" => return Ok(Duration::MAX),
        _ => {}
    }
    let mut total: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        if number.is_empty() {
            return Err(format!("expected a number at {rest:?}"));
        }
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c.is_whitespace())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        if unit.is_empty() {
            return Err(format!("{number} has no unit (ns, us, ms, s, m, h, d)"));
        }
        let scale = UNITS
            .iter()
            .find(|(names, _)| names.contains(&unit))
            .map(|(_, nanos)| *nanos)
            .ok_or_else(|| format!("unknown unit {unit:?} (ns, us, ms, s, m, h, d)"))?;
        total = total
            .checked_add(scale_number(number, scale)?)
            .ok_or("too large")?;
        rest = tail.trim_start();
    }
    let secs = u64::try_from(total / NANOS_PER_SEC).map_err(|_| "too large")?;
    Ok(Duration::new(secs, (total % NANOS_PER_SEC) as u32))
}

/// `number` (digits, optionally with one decimal point) times `scale` nanoseconds;
/// digits finer than a nanosecond are dropped.
fn scale_number(number: &str, scale: u128) -> Result<u128, String> {
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.is_empty() && frac.is_empty() || frac.contains('.') {
        return Err(format!("bad number {number:?}"));
    }
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| format!("bad number {number:?}"))?
    };
    let mut nanos = int.checked_mul(scale).ok_or("too large")?;
    let mut place = scale;
    for digit in frac.bytes() {
        place /= 10;
        // Checked: an integer part just below the limit plus a fraction overflowed
        // (a panic in debug builds, a wrapped tiny duration in release).
        nanos = nanos
            .checked_add(u128::from(digit - b'0') * place)
            .ok_or("too large")?;
    }
    Ok(nanos)
}

/// Writes `d` as whole units from hours down (`"1h30m"`, `"200ms"`, `"1s500ms"`),
/// `"0s"` for zero and `"never"` for `Duration::MAX`; [`parse_duration`] reads every
/// output back exactly.
fn format_duration(d: Duration) -> String {
    if d == Duration::MAX {
        return "never".into();
    }
    if d.is_zero() {
        return "0s".into();
    }
    let mut nanos = d.as_nanos();
    let mut out = String::new();
    // Days are not written: "48h" reads better than "2d" in a config file.
    for (names, scale) in &UNITS[1..] {
        let n = nanos / scale;
        if n > 0 {
            out.push_str(&format!("{n}{}", names[0]));
            nanos %= scale;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        let ms = Duration::from_millis;
        assert_eq!(parse_duration("200ms"), Ok(ms(200)));
        assert_eq!(parse_duration("5s"), Ok(ms(5000)));
        assert_eq!(parse_duration("1.5s"), Ok(ms(1500)));
        assert_eq!(parse_duration(".5s"), Ok(ms(500)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("2min"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3us"), Ok(Duration::from_nanos(3000)));
        assert_eq!(parse_duration("3µs"), Ok(Duration::from_nanos(3000)));
        assert_eq!(parse_duration(" 0 "), Ok(Duration::ZERO));
        assert_eq!(parse_duration("never"), Ok(Duration::MAX));
    }

    #[test]
    fn refuses_what_is_not_a_duration() {
        for bad in [
            "",
            "5",
            "s",
            "5x",
            "5 s",
            "1..5s",
            "-1s",
            "5s!",
            "1e3ms",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn every_written_duration_reads_back_exactly() {
        for d in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_millis(1500),
            Duration::from_secs(86_400 * 3 + 61),
            Duration::new(u64::MAX, 999_999_998),
            Duration::MAX,
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1s500ms");
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
    }
}
