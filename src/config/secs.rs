//! Durations as the file spells them, in seconds (`lock_timeout_secs = 30`,
//! `initial_backoff_secs = 0.5`), parsed once into `Duration`.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A whole or fractional number of seconds, 0 or more.
pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let secs = f64::deserialize(d)?;
    Duration::try_from_secs_f64(secs).map_err(|_| {
        serde::de::Error::custom(format!("{secs} is not a number of seconds (0 or more)"))
    })
}
