//! When to try again, and when to give up: a retry schedule with jitter, a maximum number of
//! attempts and a time-to-live, as Event Grid does (the policy ADT users know), every number
//! configurable. Pure, so it can be tested without a clock.

use crate::config::DeliveryConfig;
use std::time::Duration;

/// The retry policy of one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Wait before retry *n*; the last entry repeats.
    pub schedule: Vec<Duration>,
    pub max_attempts: u32,
    /// Age (since acceptance) after which an event is not tried again.
    pub ttl: Duration,
    /// Each wait is scaled by a random factor in `[1 - jitter, 1 + jitter]`.
    pub jitter: f64,
}

/// Why an event is given up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUp {
    /// Its time-to-live passed.
    TtlExpired,
    /// It used every attempt.
    MaxAttempts,
    /// The destination refused it for good (bad request, too large, entity not found).
    Permanent,
}

impl GiveUp {
    /// The stable label used in metrics and dead-letter metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            GiveUp::TtlExpired => "ttl_expired",
            GiveUp::MaxAttempts => "max_attempts",
            GiveUp::Permanent => "permanent",
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    RetryAfter(Duration),
    GiveUp(GiveUp),
}

impl RetryPolicy {
    pub fn from_config(config: &DeliveryConfig) -> Self {
        Self {
            schedule: config.retry_schedule_seconds.iter().map(|&s| Duration::from_secs(s)).collect(),
            max_attempts: config.max_attempts,
            ttl: Duration::from_secs(config.ttl_seconds),
            jitter: config.jitter,
        }
    }

    /// The scheduled wait before retry `n` (1-based), without jitter.
    pub fn base_delay(&self, retry: u32) -> Duration {
        let i = (retry.max(1) as usize - 1).min(self.schedule.len().saturating_sub(1));
        self.schedule.get(i).copied().unwrap_or(Duration::from_secs(10))
    }

    /// After `attempts` failed attempts of an event now `age` old, with an optional server hint
    /// (`Retry-After`, server busy): retry when, or give up why. `random` is in `[0, 1)`.
    pub fn decide(&self, attempts: u32, age: Duration, hint: Option<Duration>, random: f64) -> Decision {
        if attempts >= self.max_attempts {
            return Decision::GiveUp(GiveUp::MaxAttempts);
        }
        if age >= self.ttl {
            return Decision::GiveUp(GiveUp::TtlExpired);
        }
        let base = self.base_delay(attempts);
        let factor = 1.0 + self.jitter * (2.0 * random.clamp(0.0, 1.0) - 1.0);
        let wait = base.mul_f64(factor.max(0.0));
        let wait = hint.map_or(wait, |h| h.max(wait));
        // Never wait past the time-to-live: the last try happens just as it runs out.
        Decision::RetryAfter(wait.min(self.ttl - age))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event_grid() -> RetryPolicy {
        RetryPolicy::from_config(&DeliveryConfig::default())
    }

    #[test]
    fn the_default_schedule_is_event_grids() {
        let p = event_grid();
        let waits: Vec<u64> = (1..=12).map(|n| p.base_delay(n).as_secs()).collect();
        assert_eq!(waits, [10, 30, 60, 300, 600, 1800, 3600, 10800, 21600, 43200, 43200, 43200]);
        assert_eq!(p.max_attempts, 30);
        assert_eq!(p.ttl, Duration::from_secs(86400));
    }

    #[test]
    fn gives_up_at_max_attempts_or_ttl() {
        let p = event_grid();
        assert_eq!(p.decide(30, Duration::ZERO, None, 0.5), Decision::GiveUp(GiveUp::MaxAttempts));
        assert_eq!(p.decide(3, Duration::from_secs(86400), None, 0.5), Decision::GiveUp(GiveUp::TtlExpired));
        assert_eq!(p.decide(1, Duration::ZERO, None, 0.5), Decision::RetryAfter(Duration::from_secs(10)));
    }

    #[test]
    fn server_hints_lengthen_waits_and_ttl_caps_them() {
        let p = event_grid();
        assert_eq!(
            p.decide(1, Duration::ZERO, Some(Duration::from_secs(45)), 0.5),
            Decision::RetryAfter(Duration::from_secs(45))
        );
        assert_eq!(
            p.decide(1, Duration::ZERO, Some(Duration::from_secs(1)), 0.5),
            Decision::RetryAfter(Duration::from_secs(10))
        );
        let near_end = Duration::from_secs(86400 - 5);
        assert_eq!(p.decide(10, near_end, None, 0.5), Decision::RetryAfter(Duration::from_secs(5)));
    }

    proptest! {
        #[test]
        fn waits_stay_within_the_jitter_band_and_the_ttl(attempts in 1u32..29, age in 0u64..86400, random in 0.0f64..1.0) {
            let p = event_grid();
            let age = Duration::from_secs(age);
            match p.decide(attempts, age, None, random) {
                Decision::RetryAfter(wait) => {
                    let base = p.base_delay(attempts).as_secs_f64();
                    prop_assert!(wait.as_secs_f64() <= base * 1.2 + 1e-6);
                    prop_assert!(wait <= p.ttl - age);
                    prop_assert!(wait.as_secs_f64() >= (base * 0.8).min((p.ttl - age).as_secs_f64()) - 1e-6);
                }
                Decision::GiveUp(_) => prop_assert!(false, "gave up early"),
            }
        }
    }
}
