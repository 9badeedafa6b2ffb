//! The faults already reported, so that one fault is one problem: a problem about a fault
//! already reported under the same reason within its window is a repeat, counted and not
//! reported. No I/O; time is a parameter.
//!
//! Memory stays bounded under a storm: entries leave in deadline order (an ordered index of
//! deadlines, so each expiry is O(log n), never a sweep of the whole map), and at most
//! [`CAPACITY`] are kept; past that the entry closest to its deadline goes first, counted.

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
    time::Duration,
};

use crate::time::Mono;

/// At most this many faults are remembered at once.
pub const CAPACITY: usize = 65_536;

/// What [`ReportedFaults::check`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen<O> {
    /// Not reported within its window: report it (it is remembered from now on).
    New,
    /// Already reported within its window, first seen from `origin`.
    Repeat {
        /// Where the first report came from.
        origin: O,
    },
}

#[derive(Clone, Debug)]
struct Entry<O> {
    /// When the window started (the first report, or the last repeat of a sliding window).
    since: Mono,
    window: Duration,
    origin: O,
    /// Its key in `by_deadline`.
    deadline: (Mono, u64),
}

impl<O> Entry<O> {
    fn expired(&self, now: Mono) -> bool {
        // Compared as elapsed time, so a window never overflows the clock.
        now.since(self.since) >= self.window
    }
}

/// Reported faults by key, each until its window ends. See the module documentation.
#[derive(Clone, Debug)]
pub struct ReportedFaults<K, O> {
    entries: HashMap<K, Entry<O>>,
    by_deadline: BTreeMap<(Mono, u64), K>,
    next_id: u64,
    capacity: usize,
    evicted: u64,
}

impl<K: Clone + Eq + Hash, O: Copy> Default for ReportedFaults<K, O> {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl<K: Clone + Eq + Hash, O: Copy> ReportedFaults<K, O> {
    /// Remembers at most `capacity` faults.
    pub fn with_capacity(capacity: usize) -> Self {
        ReportedFaults {
            entries: HashMap::new(),
            by_deadline: BTreeMap::new(),
            next_id: 0,
            capacity: capacity.max(1),
            evicted: 0,
        }
    }

    /// Checks `key` at `now`: new (and remembered for `window`), or a repeat within the window
    /// (with `sliding`, a repeat restarts the window).
    pub fn check(
        &mut self,
        key: &K,
        origin: O,
        window: Duration,
        sliding: bool,
        now: Mono,
    ) -> Seen<O> {
        self.expire(now);
        if let Some(entry) = self.entries.get(key)
            && !entry.expired(now)
        {
            let first = entry.origin;
            if sliding {
                self.remember(key.clone(), first, window, now);
            }
            return Seen::Repeat { origin: first };
        }
        self.remember(key.clone(), origin, window, now);
        Seen::New
    }

    /// How many faults are remembered now.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Faults forgotten before their window ended because [`CAPACITY`] was reached.
    #[cfg(test)]
    pub fn evicted(&self) -> u64 {
        self.evicted
    }

    fn remember(&mut self, key: K, origin: O, window: Duration, now: Mono) {
        if let Some(old) = self.entries.remove(&key) {
            self.by_deadline.remove(&old.deadline);
        } else if self.entries.len() >= self.capacity
            && let Some((_, oldest)) = self.by_deadline.pop_first()
        {
            self.entries.remove(&oldest);
            self.evicted += 1;
        }
        let deadline = (now.saturating_add(window), self.next_id);
        self.next_id += 1;
        self.by_deadline.insert(deadline, key.clone());
        self.entries.insert(
            key,
            Entry {
                since: now,
                window,
                origin,
                deadline,
            },
        );
    }

    /// Forgets, in deadline order, every fault whose window ended by `now`.
    fn expire(&mut self, now: Mono) {
        while let Some((&deadline, key)) = self.by_deadline.first_key_value() {
            if deadline.0 > now || !self.entries.get(key).is_none_or(|e| e.expired(now)) {
                break;
            }
            if let Some(key) = self.by_deadline.remove(&deadline) {
                self.entries.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: u64) -> Mono {
        Mono::since_boot(Duration::from_secs(secs))
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn repeats_within_the_window() {
        let mut r = ReportedFaults::default();
        assert_eq!(r.check(&"a", 1, MIN, false, t(0)), Seen::New);
        assert_eq!(
            r.check(&"a", 2, MIN, false, t(59)),
            Seen::Repeat { origin: 1 }
        );
        assert_eq!(r.check(&"b", 2, MIN, false, t(59)), Seen::New);
        // A fixed window runs from the first report.
        assert_eq!(r.check(&"a", 2, MIN, false, t(60)), Seen::New);
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn a_sliding_window_restarts_at_each_repeat() {
        let mut r = ReportedFaults::default();
        assert_eq!(r.check(&"hung", 1, MIN, true, t(0)), Seen::New);
        for s in [50, 100, 150] {
            assert_eq!(
                r.check(&"hung", 1, MIN, true, t(s)),
                Seen::Repeat { origin: 1 }
            );
        }
        assert_eq!(r.check(&"hung", 1, MIN, true, t(210)), Seen::New);
    }

    #[test]
    fn entries_leave_in_deadline_order() {
        let mut r = ReportedFaults::default();
        for i in 0..1000u64 {
            r.check(&i, (), Duration::from_secs(i + 1), false, t(0));
        }
        // At t=500 every fault with a window up to 500 s is gone.
        r.check(&5000, (), MIN, false, t(500));
        assert_eq!(r.len(), 1000 - 500 + 1);
        // A window longer than the clock can add never overflows, and stays until it ends.
        r.check(&9, (), Duration::MAX, false, t(500));
        assert_eq!(
            r.check(&9, (), MIN, false, Mono::ZERO.saturating_add(Duration::MAX)),
            Seen::Repeat { origin: () }
        );
    }

    #[test]
    fn memory_is_bounded() {
        let mut r = ReportedFaults::with_capacity(100);
        let hour = Duration::from_secs(3600);
        for i in 0..1000u64 {
            // Later faults have later deadlines: the earliest ones are evicted first.
            assert_eq!(r.check(&i, (), hour, false, t(i)), Seen::New);
        }
        assert_eq!(r.len(), 100);
        assert_eq!(r.evicted(), 900);
        assert_eq!(
            r.check(&999, (), hour, false, t(999)),
            Seen::Repeat { origin: () }
        );
        assert_eq!(r.check(&0, (), hour, false, t(999)), Seen::New);
    }
}
