//! Node conditions: one small state machine per condition type, the one place npd keeps the
//! state of its conditions (exporters only show what they were told). Every condition starts
//! False with its declared reason and message; a permanent rule sets it True (NPD's semantics:
//! a change is reported only when the status or the reason changes); opt-in recovery returns
//! it to its default False state after a quiet period, reported as a Normal change. No I/O; the
//! time is always a parameter: quiet periods on the kernel's monotonic clock, transition times
//! on the wall clock.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use crate::{
    problem::{Condition, ConditionChange, ConditionStatus},
    time::{Mono, WallClock},
};

/// The state of every condition npd owns.
#[derive(Clone, Debug, Default)]
pub struct ConditionManager {
    conditions: Vec<State>,
    by_type: HashMap<String, usize>,
}

#[derive(Clone, Debug)]
struct State {
    source: String,
    default_reason: String,
    default_message: String,
    current: Condition,
    /// If it recovers: since when it is quiet, and how long a quiet period recovers it.
    recover: Option<(Mono, Duration)>,
}

impl State {
    /// When its quiet period ends, if it recovers (saturating: never overflows).
    fn recover_at(&self) -> Option<Mono> {
        self.recover
            .map(|(since, after)| since.saturating_add(after))
    }

    /// Whether its quiet period has ended by `now`, compared as elapsed time: a deadline the
    /// clock cannot hold (saturated) is never reached early.
    fn recovers_by(&self, now: Mono) -> bool {
        self.recover
            .is_some_and(|(since, after)| now.since(since) >= after)
    }
}

impl ConditionManager {
    /// Declares a condition (False, default reason and message). Redeclaring a type is ignored.
    pub fn declare(
        &mut self,
        source: &str,
        type_: &str,
        reason: &str,
        message: &str,
        now: SystemTime,
    ) {
        if self.by_type.contains_key(type_) {
            return;
        }
        self.by_type.insert(type_.to_owned(), self.conditions.len());
        self.conditions.push(State {
            source: source.to_owned(),
            default_reason: reason.to_owned(),
            default_message: message.to_owned(),
            current: Condition {
                type_: type_.to_owned(),
                status: ConditionStatus::False,
                reason: reason.to_owned(),
                message: message.to_owned(),
                transition_time: now,
            },
            recover: None,
        });
    }

    /// Every condition's current state.
    pub fn all(&self) -> Vec<ConditionChange> {
        self.conditions.iter().map(State::change).collect()
    }

    /// Sets every condition's default False state's transition time (before anything happened).
    pub fn set_initial_time(&mut self, now: SystemTime) {
        for s in &mut self.conditions {
            if s.current.status == ConditionStatus::False && s.current.reason == s.default_reason {
                s.current.transition_time = now;
            }
        }
    }

    /// A permanent rule fired at `now` (kernel time, and its wall-clock time): the condition
    /// becomes True with this reason. Returns the change when the status or the reason changed
    /// (NPD's rule), `None` otherwise. `recover_after`: when the condition returns to False if
    /// nothing sets it again; `None` makes it stay True.
    pub fn set_true(
        &mut self,
        type_: &str,
        reason: &str,
        message: &str,
        (now, wall): (Mono, SystemTime),
        recover_after: Option<Duration>,
    ) -> Option<ConditionChange> {
        let s = &mut self.conditions[*self.by_type.get(type_)?];
        s.recover = recover_after.map(|after| (now, after));
        if s.current.status == ConditionStatus::True && s.current.reason == reason {
            return None;
        }
        s.current = Condition {
            type_: type_.to_owned(),
            status: ConditionStatus::True,
            reason: reason.to_owned(),
            message: message.to_owned(),
            transition_time: wall,
        };
        Some(s.change())
    }

    /// Takes over a condition's state found on the Node at start (an agent restart must not
    /// flip it): the condition now has that state, and a True one recovers `recover_after`
    /// from `now` when given, as if its rule had just fired. Returns the state when npd owns
    /// the type and it differs from what npd had.
    pub fn adopt(
        &mut self,
        found: &Condition,
        now: Mono,
        recover_after: Option<Duration>,
    ) -> Option<ConditionChange> {
        let s = &mut self.conditions[*self.by_type.get(&found.type_)?];
        s.recover = match found.status {
            ConditionStatus::True => recover_after.map(|after| (now, after)),
            _ => None,
        };
        if s.current == *found {
            return None;
        }
        s.current = found.clone();
        Some(s.change())
    }

    /// A condition's declared default (False) reason and message.
    pub fn default_of(&self, type_: &str) -> Option<(&str, &str)> {
        let s = &self.conditions[*self.by_type.get(type_)?];
        Some((&s.default_reason, &s.default_message))
    }

    /// Sets a condition's state as it is (a plugin's result decided it): the change, or
    /// `None` when npd does not own the type. No recovery is pending after it.
    pub fn set(
        &mut self,
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: &str,
        wall: SystemTime,
    ) -> Option<ConditionChange> {
        let s = &mut self.conditions[*self.by_type.get(type_)?];
        s.recover = None;
        s.current = Condition {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.to_owned(),
            transition_time: wall,
        };
        Some(s.change())
    }

    /// The earliest pending recovery.
    pub fn next_deadline(&self) -> Option<Mono> {
        self.conditions.iter().filter_map(State::recover_at).min()
    }

    /// Recovers every condition whose quiet period ended at or before `now`, in deadline order.
    /// Each change carries its deadline (on `clock`) as transition time.
    pub fn expire(&mut self, now: Mono, clock: &WallClock) -> Vec<ConditionChange> {
        let mut due: Vec<(Mono, usize)> = self
            .conditions
            .iter()
            .enumerate()
            .filter(|(_, s)| s.recovers_by(now))
            .filter_map(|(i, s)| s.recover_at().map(|t| (t, i)))
            .collect();
        due.sort();
        due.into_iter()
            .map(|(at, i)| {
                let s = &mut self.conditions[i];
                s.recover = None;
                s.current = Condition {
                    type_: s.current.type_.clone(),
                    status: ConditionStatus::False,
                    reason: s.default_reason.clone(),
                    message: s.default_message.clone(),
                    transition_time: clock.wall(at),
                };
                s.change()
            })
            .collect()
    }

    /// The current state of one condition.
    pub fn get(&self, type_: &str) -> Option<&Condition> {
        self.by_type
            .get(type_)
            .map(|&i| &self.conditions[i].current)
    }
}

impl State {
    fn change(&self) -> ConditionChange {
        ConditionChange {
            source: self.source.clone(),
            condition: self.current.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    /// `secs` after boot, on the kernel's clock.
    fn mono(secs: u64) -> Mono {
        Mono::since_boot(Duration::from_secs(secs))
    }

    /// `secs` after boot, and its wall-clock time (boot at the epoch).
    fn at(secs: u64) -> (Mono, SystemTime) {
        (mono(secs), t(secs))
    }

    const CLOCK: WallClock = WallClock::booted_at(SystemTime::UNIX_EPOCH);

    fn manager() -> ConditionManager {
        let mut m = ConditionManager::default();
        m.declare(
            "kernel-monitor",
            "KernelDeadlock",
            "KernelHasNoDeadlock",
            "kernel has no deadlock",
            t(0),
        );
        m
    }

    #[test]
    fn npd_semantics_without_recovery() {
        let mut m = manager();
        let c = m
            .set_true(
                "KernelDeadlock",
                "DockerHung",
                "task docker:1",
                at(10),
                None,
            )
            .unwrap();
        assert_eq!(c.condition.status, ConditionStatus::True);
        assert_eq!(c.condition.transition_time, t(10));
        assert_eq!(c.source, "kernel-monitor");
        // Same reason again: no change, message kept.
        assert!(
            m.set_true(
                "KernelDeadlock",
                "DockerHung",
                "task docker:2",
                at(20),
                None
            )
            .is_none()
        );
        assert_eq!(m.get("KernelDeadlock").unwrap().message, "task docker:1");
        // Another reason: a change.
        let c = m
            .set_true("KernelDeadlock", "Other", "x", at(30), None)
            .unwrap();
        assert_eq!(c.condition.reason, "Other");
        assert_eq!(m.next_deadline(), None);
        assert!(m.expire(mono(1_000_000), &CLOCK).is_empty());
        assert!(m.set_true("Undeclared", "r", "m", at(1), None).is_none());
    }

    #[test]
    fn adopted_true_conditions_recover_from_adoption() {
        let mut m = manager();
        let on_node = Condition {
            type_: "KernelDeadlock".into(),
            status: ConditionStatus::True,
            reason: "DockerHung".into(),
            message: "task docker:1 blocked".into(),
            transition_time: t(5),
        };
        let change = m
            .adopt(&on_node, mono(100), Some(Duration::from_secs(60)))
            .unwrap();
        assert_eq!(change.condition, on_node);
        // The same rule firing again is no change: the Node already says so.
        assert!(
            m.set_true(
                "KernelDeadlock",
                "DockerHung",
                "again",
                at(110),
                Some(Duration::from_secs(60))
            )
            .is_none()
        );
        assert_eq!(m.next_deadline(), Some(mono(170)));
        let back = m.expire(mono(170), &CLOCK);
        assert_eq!(back[0].condition.status, ConditionStatus::False);
        // Undeclared types are not adopted; adopting the current state changes nothing.
        assert!(
            m.adopt(
                &Condition {
                    type_: "Ready".into(),
                    ..on_node.clone()
                },
                mono(1),
                None
            )
            .is_none()
        );
        let current = m.get("KernelDeadlock").unwrap().clone();
        assert!(m.adopt(&current, mono(200), None).is_none());
        assert_eq!(m.next_deadline(), None);
    }

    #[test]
    fn recovery_after_a_quiet_period() {
        let mut m = manager();
        let quiet = Some(Duration::from_secs(60));
        m.set_true("KernelDeadlock", "DockerHung", "m", at(10), quiet)
            .unwrap();
        assert_eq!(m.next_deadline(), Some(mono(70)));
        // A repeat extends the quiet period.
        assert!(
            m.set_true("KernelDeadlock", "DockerHung", "m", at(50), quiet)
                .is_none()
        );
        assert_eq!(m.next_deadline(), Some(mono(110)));
        assert!(m.expire(mono(109), &CLOCK).is_empty());
        let back = m.expire(mono(200), &CLOCK);
        assert_eq!(back.len(), 1);
        let c = &back[0].condition;
        assert_eq!(
            (c.status, c.reason.as_str(), c.message.as_str()),
            (
                ConditionStatus::False,
                "KernelHasNoDeadlock",
                "kernel has no deadlock"
            )
        );
        assert_eq!(c.transition_time, t(110));
        assert_eq!(m.next_deadline(), None);
        // A rule without recovery makes it stay True.
        m.set_true("KernelDeadlock", "DockerHung", "m", at(300), quiet)
            .unwrap();
        m.set_true("KernelDeadlock", "DockerHung", "m", at(301), None);
        assert_eq!(m.next_deadline(), None);
    }
}
