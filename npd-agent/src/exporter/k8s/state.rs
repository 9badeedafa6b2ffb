//! The Kubernetes exporter's bookkeeping, without I/O: which condition state the Node should
//! have and what it has, the queue of Events waiting to be posted, the Events already posted
//! (for aggregation), and the retry backoff.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    hash::{BuildHasher as _, Hasher as _},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use prometheus::IntGauge;

use crate::{
    event::PodRef,
    problem::{Condition, ConditionStatus},
};

/// What matters of a condition for deciding whether the Node must be written: status, reason
/// and message (the transition time follows them).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Written {
    status: ConditionStatus,
    reason: String,
    message: String,
}

impl Written {
    fn of(c: &Condition) -> Self {
        Written {
            status: c.status,
            reason: c.reason.clone(),
            message: c.message.clone(),
        }
    }
}

#[derive(Debug)]
struct Entry {
    /// The state the Node should have.
    desired: Condition,
    /// The state the Node has, as far as npd knows (`None`: unknown or absent).
    written: Option<Written>,
}

/// The conditions npd owns on its Node: desired state and last written state, per type.
#[derive(Debug, Default)]
pub(super) struct ConditionBook {
    entries: BTreeMap<String, Entry>,
}

impl ConditionBook {
    /// Owns `defaults` (every condition in its default state), none of them written yet.
    pub(super) fn new(defaults: impl IntoIterator<Item = Condition>) -> Self {
        let mut book = ConditionBook::default();
        for c in defaults {
            book.set(c);
        }
        book
    }

    /// Takes over the state the Node already has for the conditions npd owns, so that an agent
    /// restart does not flip them back to their defaults. `found` holds the Node's conditions;
    /// returns the ones taken over. What the Node lacks is to be written (a Node registered
    /// again after it was deleted has none of npd's conditions).
    pub(super) fn adopt(&mut self, found: impl IntoIterator<Item = Condition>) -> Vec<Condition> {
        for entry in self.entries.values_mut() {
            entry.written = None;
        }
        let mut adopted = Vec::new();
        for c in found {
            if let Some(entry) = self.entries.get_mut(&c.type_) {
                entry.written = Some(Written::of(&c));
                entry.desired = c.clone();
                adopted.push(c);
            }
        }
        adopted
    }

    /// Whether npd owns (is configured for) this condition type.
    pub(super) fn owns(&self, type_: &str) -> bool {
        self.entries.contains_key(type_)
    }

    /// Sets the desired state of one condition (a type not seen before becomes owned too).
    pub(super) fn set(&mut self, c: Condition) {
        match self.entries.get_mut(&c.type_) {
            Some(entry) => {
                // A repeat of the current state keeps the original transition time.
                if Written::of(&entry.desired) != Written::of(&c) {
                    entry.desired = c;
                }
            }
            None => {
                self.entries.insert(
                    c.type_.clone(),
                    Entry {
                        desired: c,
                        written: None,
                    },
                );
            }
        }
    }

    /// The conditions whose desired state differs from what the Node has.
    pub(super) fn dirty(&self) -> Vec<Condition> {
        self.entries
            .values()
            .filter(|e| e.written.as_ref() != Some(&Written::of(&e.desired)))
            .map(|e| e.desired.clone())
            .collect()
    }

    /// Every owned condition in its desired state (a heartbeat writes them all).
    pub(super) fn all(&self) -> Vec<Condition> {
        self.entries.values().map(|e| e.desired.clone()).collect()
    }

    /// Records that the Node now has these states.
    pub(super) fn mark_written(&mut self, written: &[Condition]) {
        for c in written {
            if let Some(entry) = self.entries.get_mut(&c.type_) {
                entry.written = Some(Written::of(c));
            }
        }
    }
}

/// The condition types the field manager `manager` owns on `node` and no other manager does:
/// those npd wrote itself (known from the Node's `managedFields`, never guessed from a type's
/// name). Ownership of a condition means owning one of its fields (`f:status`, `f:reason`...)
/// under `f:status` / `f:conditions` / `k:{"type":"..."}`.
pub(super) fn conditions_owned_only_by(node: &ObjectMeta, manager: &str) -> Vec<String> {
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for entry in node.managed_fields.iter().flatten() {
        let Some(fields) = entry.fields_v1.as_ref() else {
            continue;
        };
        let Some(conditions) = fields.0.get("f:status").and_then(|s| s.get("f:conditions")) else {
            continue;
        };
        let Some(items) = conditions.as_object() else {
            continue;
        };
        for (key, owned) in items {
            let Some(type_) = key
                .strip_prefix("k:")
                .and_then(|k| serde_json::from_str::<serde_json::Value>(k).ok())
                .and_then(|k| k.get("type").and_then(|t| t.as_str()).map(str::to_owned))
            else {
                continue;
            };
            let owns_a_field = owned
                .as_object()
                .is_some_and(|o| o.keys().any(|k| k.starts_with("f:")));
            if !owns_a_field {
                continue;
            }
            if entry.manager.as_deref() == Some(manager) {
                ours.push(type_);
            } else {
                theirs.push(type_);
            }
        }
    }
    ours.retain(|t| !theirs.contains(t));
    ours.sort();
    ours.dedup();
    ours
}

/// What identifies repeats of one Event: the same source, type and reason about the same
/// object (its Node, or a pod a problem happened in). Distinct faults of one reason (two OOM
/// victims, two failed sectors) are repeats too: one Event with their `count`, whose message
/// is the newest one, as Kubernetes' own event correlator aggregates similar events.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct EventKey {
    /// The rule file's `source` (Event `source.component`).
    pub(super) source: String,
    /// Event `type`: `Warning` or `Normal`.
    pub(super) type_: &'static str,
    pub(super) reason: String,
    /// The pod the Event is about (in the pod's namespace); `None`: the Node.
    pub(super) pod: Option<PodRef>,
}

/// Kubernetes' prefix for the message of an Event that aggregates similar ones.
pub(super) const COMBINED_PREFIX: &str = "(combined from similar events): ";

/// One Event waiting to be posted, with the repeats folded into it while it waited.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct PendingEvent {
    pub(super) key: EventKey,
    /// The newest occurrence's message.
    pub(super) message: String,
    /// Whether occurrences with other messages were folded in.
    pub(super) combined: bool,
    /// Occurrences (at least 1).
    pub(super) count: u32,
    /// When the first and the last occurrence happened.
    pub(super) first: SystemTime,
    pub(super) last: SystemTime,
    /// The Event's name once a create was attempted: a retry (after a timeout whose create
    /// may have landed) uses the same name, so it finds its own Event (409) instead of making
    /// a second one.
    pub(super) name: Option<String>,
}

impl PendingEvent {
    /// The message to write: the newest one, marked when similar ones were folded in.
    pub(super) fn display_message(&self) -> String {
        if self.combined {
            format!("{COMBINED_PREFIX}{}", self.message)
        } else {
            self.message.clone()
        }
    }

    fn fold(&mut self, later: PendingEvent) {
        self.count = self.count.saturating_add(later.count);
        self.combined |= later.combined || later.message != self.message;
        if later.last >= self.last {
            self.message = later.message;
        }
        self.first = self.first.min(later.first);
        self.last = self.last.max(later.last);
    }
}

/// What [`EventQueue::push`] did with an occurrence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pushed {
    /// Queued as a new Event.
    Queued,
    /// Folded into an Event with the same key already waiting.
    Merged,
    /// The queue was full: dropped.
    Dropped,
}

/// A bounded queue of Events waiting to be posted; repeats of a waiting Event are folded into
/// it. Taken in order, except that an Event whose key was written too recently waits (see
/// [`EventQueue::pop_ready`]).
#[derive(Debug)]
pub(super) struct EventQueue {
    items: VecDeque<PendingEvent>,
    capacity: usize,
    /// `npd_k8s_events_queued`, kept equal to the queue's length.
    queued: IntGauge,
}

impl EventQueue {
    pub(super) fn new(capacity: usize, queued: IntGauge) -> Self {
        EventQueue {
            items: VecDeque::new(),
            capacity: capacity.max(1),
            queued,
        }
    }

    fn changed(&self) {
        self.queued
            .set(i64::try_from(self.items.len()).unwrap_or(i64::MAX));
    }

    pub(super) fn push(&mut self, key: EventKey, message: String, at: SystemTime) -> Pushed {
        let occurrence = PendingEvent {
            key,
            message,
            combined: false,
            count: 1,
            first: at,
            last: at,
            name: None,
        };
        if let Some(waiting) = self.items.iter_mut().find(|e| e.key == occurrence.key) {
            waiting.fold(occurrence);
            return Pushed::Merged;
        }
        if self.items.len() >= self.capacity {
            return Pushed::Dropped;
        }
        self.items.push_back(occurrence);
        self.changed();
        Pushed::Queued
    }

    /// The first Event whose key may be written at `now` (`ready_at` says when a key may be
    /// written next); otherwise `Err` with the earliest time one will be ready (`None` when the
    /// queue is empty).
    pub(super) fn pop_ready(
        &mut self,
        now: Instant,
        ready_at: impl Fn(&EventKey) -> Option<Instant>,
    ) -> Result<PendingEvent, Option<Instant>> {
        let mut earliest: Option<Instant> = None;
        for (i, e) in self.items.iter().enumerate() {
            match ready_at(&e.key) {
                Some(at) if at > now => earliest = Some(earliest.map_or(at, |x| x.min(at))),
                _ => {
                    let Some(event) = self.items.remove(i) else {
                        break;
                    };
                    self.changed();
                    return Ok(event);
                }
            }
        }
        Err(earliest)
    }

    /// Puts back an Event that could not be posted, first in line, folding in any repeats
    /// queued meanwhile. May exceed the capacity by one: nothing already accepted is lost.
    pub(super) fn requeue(&mut self, mut event: PendingEvent) {
        if let Some(i) = self.items.iter().position(|e| e.key == event.key)
            && let Some(later) = self.items.remove(i)
        {
            event.fold(later);
        }
        self.items.push_front(event);
        self.changed();
    }

    /// Removes everything; returns the number of occurrences removed.
    pub(super) fn clear(&mut self) -> u64 {
        let n = self.items.drain(..).map(|e| u64::from(e.count)).sum();
        self.changed();
        n
    }
}

/// An Event object already posted, which repeats update instead of creating new ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PostedEvent {
    /// `metadata.name` of the Event.
    pub(super) name: String,
    /// Its `count`.
    pub(super) count: u32,
    /// The newest occurrence's message.
    pub(super) message: String,
    /// Whether its message aggregates similar ones.
    pub(super) combined: bool,
    /// When it was last created or updated.
    pub(super) updated: Instant,
}

impl PostedEvent {
    /// Folds `event` into what was posted: the Event's new count, and whether its message then
    /// combines several.
    pub(super) fn with(&self, event: &PendingEvent) -> PendingEvent {
        let mut next = event.clone();
        next.count = self.count.saturating_add(event.count);
        next.combined |= self.combined || self.message != event.message;
        next
    }
}

/// The Events posted within the aggregation window, by key. Bounded in size.
#[derive(Debug)]
pub(super) struct PostedEvents {
    by_key: HashMap<EventKey, PostedEvent>,
    window: Duration,
}

/// At most this many posted Events are remembered (oldest forgotten first).
const POSTED_CAPACITY: usize = 4096;

impl PostedEvents {
    pub(super) fn new(window: Duration) -> Self {
        PostedEvents {
            by_key: HashMap::new(),
            window,
        }
    }

    /// The Event posted for `key` and updated within the window, if any.
    pub(super) fn get(&self, key: &EventKey, now: Instant) -> Option<&PostedEvent> {
        self.by_key
            .get(key)
            .filter(|p| now.saturating_duration_since(p.updated) < self.window)
    }

    /// When `key` may be written again, `min_interval` after its last write: repeats in a
    /// burst are folded into one write per interval.
    pub(super) fn ready_at(&self, key: &EventKey, min_interval: Duration) -> Option<Instant> {
        self.by_key.get(key).map(|p| p.updated + min_interval)
    }

    pub(super) fn forget(&mut self, key: &EventKey) {
        self.by_key.remove(key);
    }

    /// Records that the Event `name` now shows `event` (its key, count and message).
    pub(super) fn record(&mut self, event: &PendingEvent, name: String, now: Instant) {
        let key = event.key.clone();
        if self.by_key.len() >= POSTED_CAPACITY && !self.by_key.contains_key(&key) {
            let window = self.window;
            self.by_key
                .retain(|_, p| now.saturating_duration_since(p.updated) < window);
            if self.by_key.len() >= POSTED_CAPACITY
                && let Some(oldest) = self
                    .by_key
                    .iter()
                    .min_by_key(|(_, p)| p.updated)
                    .map(|(k, _)| k.clone())
            {
                self.by_key.remove(&oldest);
            }
        }
        self.by_key.insert(
            key,
            PostedEvent {
                name,
                count: event.count,
                message: event.message.clone(),
                combined: event.combined,
                updated: now,
            },
        );
    }
}

/// Exponential backoff with jitter for retries while the API server is unavailable.
#[derive(Debug)]
pub(super) struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(super) fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt: doubles from `min` up to `max`, each within ±20%
    /// so that many agents do not retry in step after an outage.
    pub(super) fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let factor = 0.8 + 0.4 * (random % 1001) as f64 / 1000.0;
        base.mul_f64(factor)
    }

    /// Back to `min` after a success.
    pub(super) fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(type_: &str, status: ConditionStatus, reason: &str, at: u64) -> Condition {
        Condition {
            type_: type_.into(),
            status,
            reason: reason.into(),
            message: format!("{reason} message"),
            transition_time: SystemTime::UNIX_EPOCH + Duration::from_secs(at),
        }
    }

    fn types(conds: &[Condition]) -> Vec<(&str, ConditionStatus)> {
        conds.iter().map(|c| (c.type_.as_str(), c.status)).collect()
    }

    use ConditionStatus::{False, True};

    #[test]
    fn defaults_are_dirty_until_written() {
        let mut book = ConditionBook::new([
            cond("KernelDeadlock", False, "KernelHasNoDeadlock", 0),
            cond("ReadonlyFilesystem", False, "FilesystemIsNotReadOnly", 0),
        ]);
        assert_eq!(
            types(&book.dirty()),
            [("KernelDeadlock", False), ("ReadonlyFilesystem", False)]
        );
        let all = book.all();
        book.mark_written(&all);
        assert!(book.dirty().is_empty());
        assert_eq!(
            book.all().len(),
            2,
            "a heartbeat still writes every condition"
        );
    }

    #[test]
    fn adoption_keeps_what_the_node_has() {
        let mut book = ConditionBook::new([
            cond("KernelDeadlock", False, "KernelHasNoDeadlock", 0),
            cond("ReadonlyFilesystem", False, "FilesystemIsNotReadOnly", 0),
        ]);
        book.adopt([
            cond("KernelDeadlock", True, "DockerHung", 7),
            // Not npd's: ignored.
            cond("Ready", True, "KubeletReady", 1),
        ]);
        // Only the condition the Node lacks needs writing, and never KernelDeadlock=False.
        assert_eq!(types(&book.dirty()), [("ReadonlyFilesystem", False)]);
        let all = book.all();
        assert_eq!(
            types(&all),
            [("KernelDeadlock", True), ("ReadonlyFilesystem", False)]
        );
        assert_eq!(
            all[0].transition_time,
            SystemTime::UNIX_EPOCH + Duration::from_secs(7)
        );
    }

    #[test]
    fn only_the_newest_state_per_condition_matters() {
        let mut book =
            ConditionBook::new([cond("KernelDeadlock", False, "KernelHasNoDeadlock", 0)]);
        let all = book.all();
        book.mark_written(&all);
        book.set(cond("KernelDeadlock", True, "DockerHung", 5));
        book.set(cond("KernelDeadlock", False, "KernelHasNoDeadlock", 6));
        assert!(
            book.dirty().is_empty(),
            "back to what the Node has: nothing to write"
        );
        book.set(cond("KernelDeadlock", True, "DockerHung", 7));
        book.set(cond("KernelDeadlock", True, "DockerHung", 9));
        let dirty = book.dirty();
        assert_eq!(types(&dirty), [("KernelDeadlock", True)]);
        assert_eq!(
            dirty[0].transition_time,
            SystemTime::UNIX_EPOCH + Duration::from_secs(7),
            "a repeat keeps the transition time"
        );
        book.set(cond("NewCondition", True, "Something", 8));
        assert_eq!(
            types(&book.dirty()),
            [("KernelDeadlock", True), ("NewCondition", True)]
        );
    }

    fn key(reason: &str) -> EventKey {
        EventKey {
            source: "kernel-monitor".into(),
            type_: "Warning",
            reason: reason.into(),
            pod: None,
        }
    }

    fn at(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(s)
    }

    fn pending(reason: &str) -> PendingEvent {
        let mut q = EventQueue::new(1, crate::metrics::int_gauge("npd_test_queued", "test"));
        q.push(key(reason), "m".into(), at(1));
        pop(&mut q).unwrap()
    }

    #[test]
    fn aggregating_into_a_posted_event() {
        let mut posted = PostedEvents::new(Duration::from_secs(600));
        let first = pending("A");
        posted.record(&first, "node.1".into(), Instant::now());
        let p = posted.get(&key("A"), Instant::now()).unwrap().clone();
        let same = p.with(&first);
        assert_eq!((same.count, same.display_message().as_str()), (2, "m"));
        let mut other = pending("A");
        other.message = "n".into();
        let next = p.with(&other);
        assert_eq!(
            (next.count, next.display_message().as_str()),
            (2, "(combined from similar events): n")
        );
    }

    #[test]
    fn ownership_of_conditions_comes_from_managed_fields() {
        let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n", "managedFields": [
                {"manager": "npd", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {
                    "f:status": {"f:conditions": {
                        ".": {},
                        "k:{\"type\":\"KernelDeadlock\"}": {".": {}, "f:status": {}, "f:reason": {}},
                        "k:{\"type\":\"StaleNpd\"}": {".": {}, "f:status": {}},
                        "k:{\"type\":\"Shared\"}": {".": {}, "f:status": {}}
                    }}}},
                {"manager": "kubelet", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {
                    "f:status": {"f:conditions": {
                        "k:{\"type\":\"Ready\"}": {".": {}, "f:status": {}},
                        "k:{\"type\":\"Shared\"}": {"f:message": {}},
                        "k:{\"type\":\"StaleNpd\"}": {".": {}}
                    }}}},
                {"manager": "node-problem-detector", "operation": "Update", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:status": {"f:conditions": {
                        "k:{\"type\":\"FrequentDockerRestart\"}": {".": {}, "f:status": {}}}}}},
                {"manager": "npd", "operation": "Update", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:labels": {}}}}
            ]}
        }))
        .unwrap();
        assert_eq!(
            conditions_owned_only_by(&node.metadata, "npd"),
            ["KernelDeadlock", "StaleNpd"],
            "Shared has a field another manager owns; kubelet's and NPD's are not npd's"
        );
        assert!(conditions_owned_only_by(&ObjectMeta::default(), "npd").is_empty());
    }

    fn pop(q: &mut EventQueue) -> Option<PendingEvent> {
        q.pop_ready(Instant::now(), |_| None).ok()
    }

    #[test]
    fn queue_folds_repeats_and_is_bounded() {
        let mut q = EventQueue::new(2, crate::metrics::int_gauge("npd_test_queued", "test"));
        assert_eq!(q.push(key("A"), "m".into(), at(1)), Pushed::Queued);
        assert_eq!(q.push(key("B"), "m".into(), at(2)), Pushed::Queued);
        assert_eq!(q.push(key("A"), "m".into(), at(3)), Pushed::Merged);
        assert_eq!(q.push(key("C"), "m".into(), at(4)), Pushed::Dropped);
        let a = pop(&mut q).unwrap();
        assert_eq!(
            (a.key.reason.as_str(), a.count, a.first, a.last),
            ("A", 2, at(1), at(3))
        );
        assert_eq!(
            a.display_message(),
            "m",
            "the same message is not a combination"
        );
        // A failed post goes back first; repeats queued meanwhile are folded in.
        assert_eq!(q.push(key("A"), "m".into(), at(5)), Pushed::Queued);
        q.requeue(a);
        assert_eq!(q.items.len(), 2);
        assert_eq!(q.queued.get(), 2, "npd_k8s_events_queued follows the queue");
        let a = pop(&mut q).unwrap();
        assert_eq!(
            (a.key.reason.as_str(), a.count, a.first, a.last),
            ("A", 3, at(1), at(5))
        );
        assert_eq!(pop(&mut q).unwrap().key.reason, "B");
        assert_eq!(pop(&mut q), None);
    }

    #[test]
    fn distinct_faults_of_one_reason_are_one_event_with_the_newest_message() {
        let mut q = EventQueue::new(8, crate::metrics::int_gauge("npd_test_queued", "test"));
        for n in 0..166 {
            let pushed = q.push(
                key("IOError"),
                format!("Buffer I/O error, logical block {n}"),
                at(n),
            );
            assert_eq!(
                pushed,
                if n == 0 {
                    Pushed::Queued
                } else {
                    Pushed::Merged
                }
            );
        }
        let e = pop(&mut q).unwrap();
        assert_eq!(e.count, 166);
        assert_eq!(
            e.display_message(),
            "(combined from similar events): Buffer I/O error, logical block 165"
        );
    }

    #[test]
    fn a_key_written_recently_waits_its_turn() {
        let now = Instant::now();
        let mut q = EventQueue::new(8, crate::metrics::int_gauge("npd_test_queued", "test"));
        q.push(key("A"), "m".into(), at(1));
        q.push(key("B"), "m".into(), at(2));
        let later = now + Duration::from_secs(1);
        let ready = |k: &EventKey| (k.reason == "A").then_some(later);
        assert_eq!(q.pop_ready(now, ready).unwrap().key.reason, "B");
        assert_eq!(q.pop_ready(now, ready), Err(Some(later)));
        assert_eq!(q.pop_ready(later, ready).unwrap().key.reason, "A");
        assert_eq!(q.pop_ready(later, ready), Err(None));
    }

    #[test]
    fn posted_events_expire_after_the_window() {
        let now = Instant::now();
        let mut posted = PostedEvents::new(Duration::from_secs(600));
        posted.record(&pending("A"), "node.1".into(), now);
        assert_eq!(
            posted
                .get(&key("A"), now + Duration::from_secs(599))
                .unwrap()
                .name,
            "node.1"
        );
        assert!(
            posted
                .get(&key("A"), now + Duration::from_secs(600))
                .is_none()
        );
        assert!(posted.get(&key("B"), now).is_none());
        assert_eq!(
            posted.ready_at(&key("A"), Duration::from_secs(1)),
            Some(now + Duration::from_secs(1))
        );
        posted.forget(&key("A"));
        assert!(posted.get(&key("A"), now).is_none());
    }

    #[test]
    fn posted_events_are_bounded() {
        let now = Instant::now();
        let mut posted = PostedEvents::new(Duration::from_secs(600));
        for i in 0..POSTED_CAPACITY + 10 {
            posted.record(
                &pending(&i.to_string()),
                format!("n.{i}"),
                now + Duration::from_millis(i as u64),
            );
        }
        assert_eq!(posted.by_key.len(), POSTED_CAPACITY);
        assert!(
            posted.get(&key("0"), now).is_none(),
            "the oldest is forgotten first"
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..6).map(|_| b.next_delay()).collect();
        for (d, base) in delays.iter().zip([100u64, 200, 400, 800, 1000, 1000]) {
            let base = Duration::from_millis(base);
            assert!(
                *d >= base.mul_f64(0.8) && *d <= base.mul_f64(1.2),
                "{d:?} vs {base:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(120));
    }
}
