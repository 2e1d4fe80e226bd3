//! Error types shared across the crate's public API.

/// A configuration value is out of range or inconsistent with another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl ConfigError {
    pub(crate) fn new(msg: impl Into<String>) -> Self {
        ConfigError(msg.into())
    }
}

impl From<crate::retry::RetryConfigError> for ConfigError {
    fn from(e: crate::retry::RetryConfigError) -> Self {
        ConfigError(e.to_string())
    }
}
