//! A wrapper for keys, SAS URLs and connection strings that never prints its contents.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A secret string (an access key, a SAS URL, a connection string).
///
/// `Debug` prints `[redacted]`; there is no `Display`. It serializes to its value, which only
/// the state store does (the file is written with mode 0600); API responses are built from types
/// that have no secret fields at all, so a secret cannot reach one by accident.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that must use it (signing, an HTTP header).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(format!("{:?}", Some(s.clone())), "Some([redacted])");
        assert_eq!(s.expose(), "hunter2");
    }
}
