//! Retention: which snapshots a policy keeps, and why. A pure function of the snapshots' times,
//! the policy, the current time and the time zone, so it can be tested on calendars.
//!
//! Rules (as restic's): `last` keeps the N newest; `hourly`/`daily`/`weekly`/`monthly`/`yearly`
//! keep the newest snapshot of each of the N most recent hours/days/ISO weeks/months/years that
//! have one, in local time; `within` keeps everything younger than a duration. A snapshot is
//! kept if any rule keeps it; the decision lists every rule that did.

use std::time::{Duration, SystemTime};

use jiff::Timestamp;
use jiff::tz::TimeZone;

use crate::id::Id;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    pub last: usize,
    pub hourly: usize,
    pub daily: usize,
    pub weekly: usize,
    pub monthly: usize,
    pub yearly: usize,
    pub within: Option<Duration>,
}

impl Policy {
    /// A policy that keeps nothing by any rule (forgetting everything is never what it means).
    pub fn is_empty(&self) -> bool {
        *self == Policy::default()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub keep: bool,
    /// The rules that keep the snapshot: `last`, `hourly`, ..., `within`.
    pub reasons: Vec<&'static str>,
}

type Bucket = (i32, i32, i32, i32);

fn bucket(rule: &str, time: &jiff::Zoned) -> Bucket {
    let (y, m, d, h) = (
        time.year() as i32,
        time.month() as i32,
        time.day() as i32,
        time.hour() as i32,
    );
    match rule {
        "hourly" => (y, m, d, h),
        "daily" => (y, m, d, 0),
        "weekly" => {
            let week = time.date().iso_week_date();
            (week.year() as i32, week.week() as i32, 0, 0)
        }
        "monthly" => (y, m, 0, 0),
        _ => (y, 0, 0, 0),
    }
}

fn timestamp(time: SystemTime) -> Timestamp {
    Timestamp::try_from(time).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Decides for each snapshot `(time, id)`, returning decisions in the order given. Snapshots
/// with equal times are ordered by id, so the result never depends on the input order.
pub fn apply(
    snapshots: &[(SystemTime, Id)],
    policy: &Policy,
    now: SystemTime,
    tz: &TimeZone,
) -> Vec<Decision> {
    let mut newest_first: Vec<usize> = (0..snapshots.len()).collect();
    newest_first.sort_by(|&a, &b| {
        let (ta, ia) = &snapshots[a];
        let (tb, ib) = &snapshots[b];
        tb.cmp(ta).then(ib.cmp(ia))
    });
    let mut rules: Vec<(&'static str, usize, Option<Bucket>)> = [
        ("hourly", policy.hourly),
        ("daily", policy.daily),
        ("weekly", policy.weekly),
        ("monthly", policy.monthly),
        ("yearly", policy.yearly),
    ]
    .into_iter()
    .map(|(name, count)| (name, count, None))
    .collect();
    let mut decisions = vec![
        Decision {
            keep: false,
            reasons: Vec::new()
        };
        snapshots.len()
    ];
    for (rank, &i) in newest_first.iter().enumerate() {
        let (time, _) = snapshots[i];
        let reasons = &mut decisions[i].reasons;
        if rank < policy.last {
            reasons.push("last");
        }
        let local = timestamp(time).to_zoned(tz.clone());
        for (name, remaining, last_bucket) in &mut rules {
            let key = bucket(name, &local);
            if *remaining > 0 && *last_bucket != Some(key) {
                reasons.push(name);
                *remaining -= 1;
                *last_bucket = Some(key);
            }
        }
        if let Some(within) = policy.within {
            // A snapshot from the future (a skewed clock) is young by any measure.
            let age = now.duration_since(time).unwrap_or_default();
            if age <= within {
                reasons.push("within");
            }
        }
        decisions[i].keep = !decisions[i].reasons.is_empty();
    }
    decisions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> SystemTime {
        SystemTime::from(text.parse::<Timestamp>().unwrap())
    }

    /// Snapshots at `times` (ids in order), the decisions as (time, reasons) of those kept.
    fn kept(times: &[&str], policy: &Policy, tz: &str) -> Vec<(String, Vec<&'static str>)> {
        let snapshots: Vec<(SystemTime, Id)> = times
            .iter()
            .enumerate()
            .map(|(i, t)| (at(t), Id([i as u8; 32])))
            .collect();
        let now = at("2030-01-01T00:00:00Z");
        let tz = TimeZone::get(tz).unwrap();
        apply(&snapshots, policy, now, &tz)
            .into_iter()
            .zip(times)
            .filter(|(d, _)| d.keep)
            .map(|(d, t)| (t.to_string(), d.reasons))
            .collect()
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day_across_a_month_end() {
        let times = [
            "2026-01-30T02:00:00Z",
            "2026-01-30T14:00:00Z",
            "2026-01-31T02:00:00Z",
            "2026-02-01T02:00:00Z",
            "2026-02-01T03:00:00Z",
            "2026-02-02T02:00:00Z",
        ];
        let policy = Policy {
            daily: 3,
            ..Policy::default()
        };
        let kept: Vec<String> = kept(&times, &policy, "UTC")
            .into_iter()
            .map(|k| k.0)
            .collect();
        assert_eq!(
            kept,
            [
                "2026-01-31T02:00:00Z",
                "2026-02-01T03:00:00Z",
                "2026-02-02T02:00:00Z"
            ]
        );
    }

    #[test]
    fn monthly_and_yearly_buckets_handle_short_months_and_leap_days() {
        let times = [
            "2023-12-31T23:00:00Z",
            "2024-01-31T12:00:00Z",
            "2024-02-28T12:00:00Z",
            "2024-02-29T12:00:00Z",
            "2024-03-01T00:30:00Z",
            "2024-03-31T12:00:00Z",
        ];
        let monthly = Policy {
            monthly: 12,
            ..Policy::default()
        };
        let kept_monthly: Vec<String> = kept(&times, &monthly, "UTC")
            .into_iter()
            .map(|k| k.0)
            .collect();
        assert_eq!(
            kept_monthly,
            [
                "2023-12-31T23:00:00Z",
                "2024-01-31T12:00:00Z",
                "2024-02-29T12:00:00Z",
                "2024-03-31T12:00:00Z"
            ]
        );
        let yearly = Policy {
            yearly: 5,
            daily: 2,
            ..Policy::default()
        };
        let kept_yearly = kept(&times, &yearly, "UTC");
        assert_eq!(
            kept_yearly,
            [
                ("2023-12-31T23:00:00Z".to_string(), vec!["yearly"]),
                ("2024-03-01T00:30:00Z".to_string(), vec!["daily"]),
                ("2024-03-31T12:00:00Z".to_string(), vec!["daily", "yearly"]),
            ]
        );
    }

    #[test]
    fn days_and_hours_are_local_including_daylight_saving_changes() {
        // Berlin: 2026-03-28T23:30Z is already Sunday 00:30 local; on 2026-10-25 the hour
        // 02:00-03:00 local happens twice (00:30Z and 01:30Z are both 02:30 local).
        let times = [
            "2026-03-28T22:30:00Z",
            "2026-03-28T23:30:00Z",
            "2026-10-25T00:30:00Z",
            "2026-10-25T01:30:00Z",
        ];
        let daily = Policy {
            daily: 10,
            ..Policy::default()
        };
        assert_eq!(kept(&times, &daily, "Europe/Berlin").len(), 3);
        assert_eq!(kept(&times, &daily, "UTC").len(), 2);
        let hourly = Policy {
            hourly: 10,
            ..Policy::default()
        };
        let kept_hourly: Vec<String> = kept(&times, &hourly, "Europe/Berlin")
            .into_iter()
            .map(|k| k.0)
            .collect();
        assert_eq!(
            kept_hourly,
            [
                "2026-03-28T22:30:00Z",
                "2026-03-28T23:30:00Z",
                "2026-10-25T01:30:00Z"
            ]
        );
    }

    #[test]
    fn weekly_buckets_are_iso_weeks_across_the_new_year() {
        // Thursday 2026-12-31 and Friday 2027-01-01 are both in ISO week 2026-W53.
        let times = [
            "2026-12-27T12:00:00Z",
            "2026-12-31T12:00:00Z",
            "2027-01-01T12:00:00Z",
            "2027-01-04T12:00:00Z",
        ];
        let weekly = Policy {
            weekly: 5,
            ..Policy::default()
        };
        let kept: Vec<String> = kept(&times, &weekly, "UTC")
            .into_iter()
            .map(|k| k.0)
            .collect();
        assert_eq!(
            kept,
            [
                "2026-12-27T12:00:00Z",
                "2027-01-01T12:00:00Z",
                "2027-01-04T12:00:00Z"
            ]
        );
    }

    #[test]
    fn equal_times_are_decided_by_id_whatever_the_order() {
        let t = at("2026-05-05T05:05:05Z");
        let policy = Policy {
            last: 1,
            ..Policy::default()
        };
        let tz = TimeZone::UTC;
        let a = apply(&[(t, Id([1; 32])), (t, Id([2; 32]))], &policy, t, &tz);
        let b = apply(&[(t, Id([2; 32])), (t, Id([1; 32]))], &policy, t, &tz);
        assert_eq!((a[0].keep, a[1].keep), (false, true));
        assert_eq!((b[0].keep, b[1].keep), (true, false));
    }

    #[test]
    fn within_last_and_empty_groups() {
        let now = at("2026-06-30T00:00:00Z");
        let snapshots = [
            (at("2026-06-29T00:00:00Z"), Id([1; 32])),
            (at("2026-06-01T00:00:00Z"), Id([2; 32])),
            (at("2026-05-01T00:00:00Z"), Id([3; 32])),
            (at("2026-07-01T00:00:00Z"), Id([4; 32])), // a clock ahead of ours
        ];
        let policy = Policy {
            last: 1,
            within: Some(Duration::from_secs(30 * 86_400)),
            ..Policy::default()
        };
        let decisions = apply(&snapshots, &policy, now, &TimeZone::UTC);
        let reasons: Vec<Vec<&str>> = decisions.iter().map(|d| d.reasons.clone()).collect();
        assert_eq!(
            reasons,
            [
                vec!["within"],
                vec!["within"],
                vec![],
                vec!["last", "within"]
            ]
        );
        assert!(!decisions[2].keep);
        assert!(apply(&[], &policy, now, &TimeZone::UTC).is_empty());
        assert!(Policy::default().is_empty() && !policy.is_empty());
    }
}
