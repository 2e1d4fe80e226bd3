//! Error types shared across the crate's public API.
//!
//! Owns [`ConfigError`], the one error every configuration check returns: it names the
//! field and the bound it broke (and wraps a component's own config error as its
//! source), so a caller can tell what to fix without parsing a message.

use std::time::Duration;

/// A configuration value is out of range or inconsistent with another.
///
/// Returned by [`NodeConfig::validate`](crate::NodeConfig::validate),
/// [`ProtoConfig::validate`](crate::ProtoConfig::validate),
/// [`HandoffConfig::validate`](crate::HandoffConfig::validate), and through
/// `NodeError::Config` by `NodeBuilder::build`, `Node::sender` and `Node::receiver`.
/// None is transient: fix the named field and try again. `field` is the path of the
/// value inside [`NodeConfig`](crate::NodeConfig) (e.g. `"proto.max_in_flight"`), or
/// inside [`ChannelOptions`](crate::ChannelOptions) / `TcpConfig` for those.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A count or size is below its minimum. Raise it to at least `min`.
    #[error("{field} is {value}, below the minimum {min}")]
    TooSmall {
        /// The field.
        field: &'static str,
        /// The configured value.
        value: u64,
        /// The smallest accepted value.
        min: u64,
    },
    /// A count or size is above its maximum (a tokio or wire limit, or a bound that
    /// keeps memory sane). Lower it to at most `max`.
    #[error("{field} is {value}, above the maximum {max}")]
    TooLarge {
        /// The field.
        field: &'static str,
        /// The configured value.
        value: u64,
        /// The largest accepted value.
        max: u64,
    },
    /// A duration is below its minimum (often: zero where a positive value is needed).
    #[error("{field} is {value:?}, below the minimum {min:?}")]
    DurationTooShort {
        /// The field.
        field: &'static str,
        /// The configured value.
        value: Duration,
        /// The shortest accepted value.
        min: Duration,
    },
    /// A duration is above its maximum. Lower it to at most `max`.
    #[error("{field} is {value:?}, above the maximum {max:?}")]
    DurationTooLong {
        /// The field.
        field: &'static str,
        /// The configured value.
        value: Duration,
        /// The longest accepted value.
        max: Duration,
    },
    /// `dedup.window` is narrower than `proto.max_in_flight`: senders would overrun the
    /// receiver's sequence window. Raise `dedup.window` (or lower the in-flight window).
    #[error(
        "dedup.window ({window}) must be at least proto.max_in_flight ({max_in_flight}): \
         senders would overrun the receiver's sequence window"
    )]
    DedupWindowBelowInFlight {
        /// `dedup.window`.
        window: u32,
        /// `proto.max_in_flight`.
        max_in_flight: usize,
    },
    /// `dedup.retention` is not longer than the longest a message may still arrive
    /// after it was first sent (retry deadline + hint TTL + shutdown drain): a late
    /// copy would find its dedup stream retired and be refused. Raise the retention or
    /// shorten those.
    #[error(
        "dedup.retention ({retention:?}) must exceed the retry deadline plus the hint TTL \
         plus shutdown_drain ({needed:?}): a late message would find its dedup stream retired"
    )]
    RetentionTooShort {
        /// `dedup.retention`.
        retention: std::time::Duration,
        /// What it must exceed.
        needed: std::time::Duration,
    },
    /// `max_payload` plus the data frame's header does not fit in the transport's frame
    /// limit: such a payload would be accepted by `send` and then never delivered.
    /// Lower `max_payload` to at most `max` or raise `TcpConfig::max_frame_len`.
    #[error(
        "max_payload ({max_payload} bytes) does not fit the TCP frame limit \
         (max_frame_len {max_frame_len} bytes): at most {max} bytes of payload"
    )]
    PayloadAboveFrameLimit {
        /// `NodeConfig::max_payload`.
        max_payload: usize,
        /// `TcpConfig::max_frame_len`.
        max_frame_len: usize,
        /// The largest `max_payload` that fits.
        max: usize,
    },
    /// `dead_letter_dir` is the hint directory (`handoff.store.dir`): the dead-letter
    /// log and the hint store would both open `<dir>/hints`, and a directory serves one
    /// store. Give the dead letters a directory of their own.
    #[error(
        "dead_letter_dir ({dir}) must not be handoff.store.dir: both stores would open {dir}/hints"
    )]
    DeadLettersInHintDir {
        /// The shared directory.
        dir: std::path::PathBuf,
    },
    /// A retry, RTT or retry-budget setting is invalid; `field` says which struct
    /// (`"proto.retry"`, `"proto.rtt"`, `"proto.retry_budget"`), the source
    /// which value.
    #[error("{field}: {source}")]
    Retry {
        /// The struct that holds the bad value.
        field: &'static str,
        /// What is wrong with it.
        #[source]
        source: crate::retry::RetryConfigError,
    },
    /// A failure-detector setting (`detector`) is invalid; see the source.
    #[error("detector: {0}")]
    Detector(#[source] crate::detector::DetectorConfigError),
    /// A TCP transport setting is invalid; see the source.
    #[error("tcp: {0}")]
    Tcp(#[source] crate::transport::tcp::TcpConfigError),
    /// A dedup setting (`dedup`) is invalid; see the source.
    #[error("dedup: {0}")]
    Dedup(#[source] crate::dedup::DedupError),
    /// A hint store setting (`handoff.store`) is invalid; see the source.
    #[error("handoff.store: {0}")]
    HintStore(#[source] crate::handoff::HintError),
}

impl ConfigError {
    /// The field this error is about (for the wrapped component errors, the component).
    pub fn field(&self) -> &'static str {
        match self {
            ConfigError::TooSmall { field, .. }
            | ConfigError::TooLarge { field, .. }
            | ConfigError::DurationTooShort { field, .. }
            | ConfigError::DurationTooLong { field, .. }
            | ConfigError::Retry { field, .. } => field,
            ConfigError::DedupWindowBelowInFlight { .. } => "dedup.window",
            ConfigError::RetentionTooShort { .. } => "dedup.retention",
            ConfigError::PayloadAboveFrameLimit { .. } => "max_payload",
            ConfigError::DeadLettersInHintDir { .. } => "dead_letter_dir",
            ConfigError::Detector(_) => "detector",
            ConfigError::Tcp(_) => "tcp",
            ConfigError::Dedup(_) => "dedup",
            ConfigError::HintStore(_) => "handoff.store",
        }
    }
}

/// Range checks shared by the config `validate` functions.
pub(crate) mod check {
    use super::ConfigError;
    use std::time::Duration;

    /// `min <= value <= max` for a count.
    pub(crate) fn count(
        field: &'static str,
        value: u64,
        min: u64,
        max: u64,
    ) -> Result<(), ConfigError> {
        if value < min {
            return Err(ConfigError::TooSmall { field, value, min });
        }
        if value > max {
            return Err(ConfigError::TooLarge { field, value, max });
        }
        Ok(())
    }

    /// `min <= value <= max` for a duration.
    pub(crate) fn duration(
        field: &'static str,
        value: Duration,
        min: Duration,
        max: Duration,
    ) -> Result<(), ConfigError> {
        if value < min {
            return Err(ConfigError::DurationTooShort { field, value, min });
        }
        if value > max {
            return Err(ConfigError::DurationTooLong { field, value, max });
        }
        Ok(())
    }

    /// `usize` as `u64` for the error (saturating: `usize` is at most 64 bits here).
    pub(crate) fn u(v: usize) -> u64 {
        u64::try_from(v).unwrap_or(u64::MAX)
    }
}
