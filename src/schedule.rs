//! When schedules fire: cron expressions and cadences in a time zone.
//!
//! Fire times are computed here rather than by the cron library's own time
//! zone support, which fires twice or an hour off around DST changes. The
//! expression is matched against *local wall-clock time* (croner is asked
//! about a naive local time dressed as UTC, where no DST exists), and each
//! matching wall-clock time is then placed on the real timeline the way
//! Vixie cron does:
//! - a time that does not exist that day (spring forward) fires once, at
//!   the first instant after the gap (02:30 becomes 03:00 EDT);
//! - a time that exists twice (fall back) fires once, at the first of the
//!   two, unless the hour field is a wildcard (`0 * * * *`, `*/15 * * * *`):
//!   such a schedule fires in both repeated hours, so an hourly job has no
//!   two-hour gap that night;
//! - every other day it fires at exactly the stated local time.
//!
//! Fire times are whole seconds, whatever the instant they are computed
//! from: daemons on several hosts fire a schedule at the same instant, and
//! the fire time they claim in PostgreSQL is the same value.

use chrono::offset::LocalResult;
use chrono::{DateTime, Duration, NaiveDateTime, Offset, SubsecRound, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;

/// A `cron`/`cadence` and `timezone` that do not parse: the key at fault
/// (within its `[[schedule]]`) and why.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {message}")]
pub struct TimingError {
    pub key: &'static str,
    pub message: String,
}

/// When one `[[schedule]]` fires: its expression in its time zone.
#[derive(Debug, Clone)]
pub struct Timing {
    /// The expression as the user wrote it (or the cadence's name).
    pub spec: String,
    pub tz: Tz,
    cron: Cron,
    /// The hour field starts with `*`: fires in both hours of a fall-back.
    hour_wildcard: bool,
}

/// More than the largest DST shift in use (2 h, Antarctica/Troll): the
/// window in which a later wall-clock time can be an earlier instant.
const DST_WINDOW: Duration = Duration::hours(3);

impl Timing {
    /// Exactly one of `cron` (5 fields, or 6 with seconds first) and
    /// `cadence` (`hourly`, `daily`, `weekly`); `timezone` is an IANA name,
    /// UTC when absent.
    pub fn parse(
        cron: Option<&str>,
        cadence: Option<&str>,
        timezone: Option<&str>,
    ) -> Result<Timing, TimingError> {
        let err = |key, message: String| TimingError { key, message };
        let (spec, expr) = match (cron, cadence) {
            (Some(c), None) => (c.to_string(), c.to_string()),
            (None, Some(c)) => {
                let expr = match c {
                    "hourly" => "0 * * * *",
                    "daily" => "0 0 * * *",
                    "weekly" => "0 0 * * 0",
                    other => {
                        return Err(err(
                            "cadence",
                            format!("`{other}` is not one of hourly, daily, weekly"),
                        ))
                    }
                };
                (c.to_string(), expr.to_string())
            }
            _ => return Err(err("cron", "set exactly one of `cron` or `cadence`".into())),
        };
        let field_list: Vec<&str> = expr.split_whitespace().collect();
        let fields = field_list.len();
        if !(5..=6).contains(&fields) {
            return Err(err(
                "cron",
                format!("`{expr}` has {fields} fields; use 5 (minute hour day month weekday) or 6 (seconds first)"),
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(&expr)
            .map_err(|e| err("cron", format!("`{expr}`: {e}")))?;
        let tz = match timezone {
            None => chrono_tz::UTC,
            Some(name) => name
                .parse::<Tz>()
                .map_err(|_| err("timezone", format!("`{name}` is not an IANA time zone")))?,
        };
        let hour_wildcard = field_list[if fields == 6 { 2 } else { 1 }].starts_with('*');
        Ok(Timing {
            spec,
            tz,
            cron,
            hour_wildcard,
        })
    }

    /// The first fire time strictly after `after`, in whole seconds.
    ///
    /// Wall-clock matches come in wall-clock order; placed on the timeline
    /// they are in order too, except near a fall-back, where a later wall
    /// time can be an earlier instant. Away from a DST change the first
    /// placement after `after` is the answer; near one, every match within
    /// [`DST_WINDOW`] of it is placed and the earliest wins.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let near_change = |t: DateTime<Utc>| {
            let offset = |t: DateTime<Utc>| t.with_timezone(&self.tz).offset().fix();
            offset(t - DST_WINDOW) != offset(t + DST_WINDOW)
        };
        let whole = after.trunc_subsecs(0);
        let mut probe = whole.with_timezone(&self.tz).naive_local();
        if near_change(whole) {
            // The repeated hour's second pass has wall times before `after`'s.
            probe -= DST_WINDOW;
        }
        let mut best: Option<(DateTime<Utc>, NaiveDateTime)> = None;
        // Per-second schedules take the most steps: a few thousand inside
        // the window, once a year.
        for _ in 0..100_000 {
            let wall = self
                .cron
                .find_next_occurrence(&Utc.from_utc_datetime(&probe), false)
                .ok()?
                .naive_utc();
            if let Some((at, found_wall)) = best {
                if wall > found_wall + DST_WINDOW || !near_change(at) {
                    return Some(at);
                }
            }
            for at in self.place(wall) {
                if at > after && best.is_none_or(|(b, _)| at < b) {
                    best = Some((at, best.map_or(wall, |(_, w)| w)));
                }
            }
            probe = wall;
        }
        best.map(|(at, _)| at)
    }

    /// The instants a wall-clock time of the zone fires at: the earliest of
    /// a repeated time (both with a wildcard hour), the first instant after
    /// the gap for a skipped one.
    fn place(&self, wall: NaiveDateTime) -> Vec<DateTime<Utc>> {
        let tz = &self.tz;
        match tz.from_local_datetime(&wall) {
            LocalResult::Single(t) => vec![t.with_timezone(&Utc)],
            LocalResult::Ambiguous(first, second) if self.hour_wildcard => {
                vec![first.with_timezone(&Utc), second.with_timezone(&Utc)]
            }
            LocalResult::Ambiguous(first, _) => vec![first.with_timezone(&Utc)],
            LocalResult::None => {
                // Gaps are whole minutes in every zone still in use; walk to
                // the first wall-clock minute that exists again.
                let start = wall - Duration::seconds(wall.and_utc().timestamp() % 60);
                vec![(1..=24 * 60)
                    .map(|m| start + Duration::minutes(m))
                    .find_map(|w| tz.from_local_datetime(&w).earliest())
                    .map(|t| t.with_timezone(&Utc))
                    .unwrap_or_else(|| Utc.from_utc_datetime(&wall))]
            }
        }
    }

    /// The next `n` fire times after `from`.
    pub fn upcoming(&self, from: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut t = from;
        while out.len() < n {
            match self.next_after(t) {
                Some(next) => {
                    out.push(next);
                    t = next;
                }
                None => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(cron: &str, tz: &str) -> Timing {
        Timing::parse(Some(cron), None, Some(tz)).unwrap()
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn fires(s: &Timing, from: &str, n: usize) -> Vec<String> {
        s.upcoming(utc(from), n)
            .iter()
            .map(|t| t.to_rfc3339())
            .collect()
    }

    #[test]
    fn spring_forward_skipped_time_runs_once_after_the_gap() {
        // 2026-03-08: 02:00 EST jumps to 03:00 EDT in New York.
        let s = sched("30 2 * * *", "America/New_York");
        assert_eq!(
            fires(&s, "2026-03-06T12:00:00Z", 4),
            [
                "2026-03-07T07:30:00+00:00", // 02:30 EST
                "2026-03-08T07:00:00+00:00", // 03:00 EDT, right after the gap
                "2026-03-09T06:30:00+00:00", // 02:30 EDT
                "2026-03-10T06:30:00+00:00",
            ]
        );
    }

    #[test]
    fn spring_forward_unaffected_time_is_never_an_hour_off() {
        // The case that fires twice with the library's own zone handling.
        let s = sched("0 30 1 * * *", "America/New_York");
        assert_eq!(
            fires(&s, "2026-03-07T12:00:00Z", 3),
            [
                "2026-03-08T06:30:00+00:00", // 01:30 EST, once
                "2026-03-09T05:30:00+00:00", // 01:30 EDT
                "2026-03-10T05:30:00+00:00",
            ]
        );
        let s = sched("0 6 * * *", "America/New_York");
        assert_eq!(
            fires(&s, "2026-03-07T12:00:00Z", 2),
            ["2026-03-08T10:00:00+00:00", "2026-03-09T10:00:00+00:00"]
        );
    }

    #[test]
    fn fall_back_repeated_time_runs_once_at_the_first() {
        // 2026-11-01: 02:00 EDT falls back to 01:00 EST; 01:30 happens twice.
        let s = sched("30 1 * * *", "America/New_York");
        assert_eq!(
            fires(&s, "2026-10-31T12:00:00Z", 3),
            [
                "2026-11-01T05:30:00+00:00", // 01:30 EDT, the first one
                "2026-11-02T06:30:00+00:00", // 01:30 EST next day
                "2026-11-03T06:30:00+00:00",
            ]
        );
        // Asked from inside the repeated hour, it does not fire again.
        assert_eq!(
            fires(&s, "2026-11-01T06:10:00Z", 1),
            ["2026-11-02T06:30:00+00:00"]
        );
        let s = sched("0 6 * * *", "America/New_York");
        assert_eq!(
            fires(&s, "2026-10-31T12:00:00Z", 2),
            ["2026-11-01T11:00:00+00:00", "2026-11-02T11:00:00+00:00"]
        );
    }

    #[test]
    fn hourly_across_fall_back_fires_in_both_repeated_hours() {
        // As Vixie cron: a wildcard hour runs in the repeated hour too, so
        // there is no two-hour gap; each instant fires once.
        let s = Timing::parse(None, Some("hourly"), Some("America/New_York")).unwrap();
        assert_eq!(
            fires(&s, "2026-11-01T04:30:00Z", 4),
            [
                "2026-11-01T05:00:00+00:00", // 01:00 EDT
                "2026-11-01T06:00:00+00:00", // 01:00 EST, the repeat
                "2026-11-01T07:00:00+00:00", // 02:00 EST
                "2026-11-01T08:00:00+00:00",
            ]
        );
        // Asked from inside the repeated hour, the repeat is still ahead.
        assert_eq!(
            fires(&s, "2026-11-01T05:30:00Z", 1),
            ["2026-11-01T06:00:00+00:00"]
        );
        let s = sched("*/15 * * * *", "America/New_York");
        let f = fires(&s, "2026-11-01T05:40:00Z", 6);
        assert_eq!(
            f,
            [
                "2026-11-01T05:45:00+00:00", // 01:45 EDT
                "2026-11-01T06:00:00+00:00", // 01:00 EST
                "2026-11-01T06:15:00+00:00",
                "2026-11-01T06:30:00+00:00",
                "2026-11-01T06:45:00+00:00",
                "2026-11-01T07:00:00+00:00", // 02:00 EST
            ]
        );
    }

    #[test]
    fn fire_times_are_whole_seconds() {
        let s = sched("*/5 * * * * *", "UTC");
        let after = utc("2026-01-01T00:00:01.734Z");
        let next = s.next_after(after).unwrap();
        assert_eq!(next.to_rfc3339(), "2026-01-01T00:00:05+00:00");
        assert_eq!(next.timestamp_subsec_nanos(), 0);
        let s = sched("0 6 * * *", "America/New_York");
        let next = s.next_after(utc("2026-03-06T12:00:00.999999Z")).unwrap();
        assert_eq!(next.timestamp_subsec_nanos(), 0);
        // A fire time is strictly after: from exactly a fire, the next one.
        let at = utc("2026-01-01T00:00:05Z");
        assert_eq!(
            sched("*/5 * * * * *", "UTC")
                .next_after(at)
                .unwrap()
                .to_rfc3339(),
            "2026-01-01T00:00:10+00:00"
        );
    }

    #[test]
    fn six_fields_and_bad_expressions() {
        let s = sched("*/5 * * * * *", "UTC");
        assert_eq!(
            fires(&s, "2026-01-01T00:00:01Z", 2),
            ["2026-01-01T00:00:05+00:00", "2026-01-01T00:00:10+00:00"]
        );
        let bad = Timing::parse(Some("61 * * * *"), None, None)
            .unwrap_err()
            .to_string();
        assert!(bad.starts_with("cron: `61 * * * *`"), "{bad}");
    }
}
