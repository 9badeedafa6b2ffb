//! Every task the agent starts is tracked and stops on a cancellation token; stopping a group
//! of them waits, with a bound, for all of them to end.

use std::time::Duration;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// A group of tracked tasks that stop together.
#[derive(Clone, Debug, Default)]
pub struct Tasks {
    /// Cancelled when the group stops: every task of the group selects on it.
    pub cancel: CancellationToken,
    /// Every task of the group.
    pub tracker: TaskTracker,
}

impl Tasks {
    /// Cancels the group and waits for its tasks to end, at most `limit`; says so when some
    /// did not (`what`: which group).
    pub async fn stop(&self, limit: Duration, what: &str) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(limit, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "{what} did not stop within {}",
                humantime::format_duration(limit)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stopping_waits_for_tasks_that_select_on_the_token() {
        let tasks = Tasks::default();
        let cancel = tasks.cancel.clone();
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stopped.clone();
        tasks.tracker.spawn(async move {
            cancel.cancelled().await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        tasks.stop(Duration::from_secs(1), "test tasks").await;
        assert!(stopped.load(std::sync::atomic::Ordering::SeqCst));
        assert!(tasks.tracker.is_empty());
    }
}
