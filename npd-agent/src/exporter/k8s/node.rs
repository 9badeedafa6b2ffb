//! The Node task: reads the Node, adopts npd's conditions found there, removes the ones npd
//! wrote but no longer configures, and writes every condition change and heartbeat to
//! `nodes/<name>/status`. See the parent module for the error classes.

use kube::{
    Api,
    api::{Patch, PatchParams},
    core::DynamicObject,
};
use tokio::{sync::mpsc, time::Instant};

use super::{
    ApiCall, CallError, Caller, ErrorClass, FIELD_MANAGER, condition_from_json,
    state::{ConditionBook, conditions_owned_only_by},
};
use crate::problem::{Condition, node_condition_json};

/// The `problems` key of this task.
const TASK: &str = "node";

pub(super) struct NodeWriter {
    caller: Caller,
    nodes: Api<DynamicObject>,
    book: ConditionBook,
    adoptions: mpsc::UnboundedSender<Vec<Condition>>,
    /// After a 422 on several conditions: write one at a time to find the one refused.
    one_at_a_time: bool,
    /// The next write is every owned condition (start, heartbeat), not only the changed ones.
    full_write: bool,
}

/// Why the idle wait ended.
enum Wake {
    Changes,
    Heartbeat,
    Shutdown,
}

/// What a write round ended with.
enum Next {
    /// Go on writing (or waiting).
    Continue,
    /// The Node is gone: read it again.
    ReadNode,
    /// The shutdown deadline passed.
    Stop,
}

impl NodeWriter {
    pub(super) fn new(
        caller: Caller,
        nodes: Api<DynamicObject>,
        defaults: impl IntoIterator<Item = Condition>,
        adoptions: mpsc::UnboundedSender<Vec<Condition>>,
    ) -> Self {
        NodeWriter {
            caller,
            nodes,
            book: ConditionBook::new(defaults),
            adoptions,
            one_at_a_time: false,
            full_write: true,
        }
    }

    fn name(&self) -> &str {
        &self.caller.config.node_name
    }

    pub(super) async fn run(mut self) {
        tracing::info!(
            node = %self.name(),
            server = %self.caller.config.client.cluster_url,
            "Kubernetes exporter starting"
        );
        loop {
            let Some(node) = self.read_node().await else {
                break;
            };
            self.adopt(node).await;
            match self.write_loop().await {
                Next::ReadNode => continue,
                Next::Stop | Next::Continue => break,
            }
        }
        self.stop();
    }

    /// Reads the Node, retrying until it answers (or the shutdown deadline passes). While it
    /// is missing or forbidden, `/healthz` says so.
    async fn read_node(&mut self) -> Option<DynamicObject> {
        loop {
            if self.caller.past_deadline() {
                return None;
            }
            let name = self.name().to_owned();
            match self
                .caller
                .call(ApiCall::GetNode, self.nodes.get(&name))
                .await
            {
                Ok(node) => {
                    self.caller.succeeded();
                    self.caller.shared.set_problem(TASK, None);
                    return Some(node);
                }
                Err(err) => {
                    let problem = match err.class() {
                        ErrorClass::NotFound => Some(format!(
                            "Node {name} not found (not registered yet, or deleted): conditions \
                             are written once it exists"
                        )),
                        ErrorClass::Forbidden => Some(format!(
                            "forbidden to get nodes/{name} ({err}): npd's ClusterRole must grant \
                             nodes get"
                        )),
                        _ => None,
                    };
                    self.caller.shared.set_problem(TASK, problem);
                    self.caller.failed("reading the node", &err).await;
                }
            }
        }
    }

    /// Takes over what the Node has, hands it to the engine, and removes the conditions npd
    /// wrote and no longer configures.
    async fn adopt(&mut self, node: DynamicObject) {
        let found: Vec<Condition> = node.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(condition_from_json)
            .collect();
        let adopted = self.book.adopt(found);
        if !adopted.is_empty() {
            let _ = self.adoptions.send(adopted);
        }
        self.caller.shared.counters.node_adopted.set(1);
        tracing::info!(node = %self.name(), "Kubernetes exporter connected");
        let stale: Vec<String> = conditions_owned_only_by(&node.metadata, FIELD_MANAGER)
            .into_iter()
            .filter(|t| !self.book.owns(t))
            .collect();
        if !stale.is_empty() {
            self.remove_stale(&stale).await;
        }
    }

    /// Deletes conditions npd wrote earlier whose rule file is gone (one try: a failure is
    /// logged, and the next start tries again).
    async fn remove_stale(&mut self, stale: &[String]) {
        let deletes: Vec<serde_json::Value> = stale
            .iter()
            .map(|t| serde_json::json!({ "type": t, "$patch": "delete" }))
            .collect();
        let patch = serde_json::json!({ "status": { "conditions": deletes } });
        let name = self.name().to_owned();
        let params = patch_params();
        let patch = Patch::Strategic(&patch);
        let request = self.nodes.patch_status(&name, &params, &patch);
        match self.caller.call(ApiCall::PatchNodeStatus, request).await {
            Ok(_) => tracing::info!(
                conditions = %stale.join(","),
                "removed conditions npd wrote earlier and no loaded rule file declares"
            ),
            Err(err) => tracing::warn!(
                conditions = %stale.join(","),
                error = %err,
                "could not remove conditions npd wrote earlier and no longer declares"
            ),
        }
    }

    /// Writes changes as they come, and every condition each heartbeat period.
    async fn write_loop(&mut self) -> Next {
        // The first write refreshes every owned condition (adopted ones keep their state).
        self.full_write = true;
        let period = self.caller.config.heartbeat_period;
        let mut next_heartbeat = Instant::now() + period;
        loop {
            self.take_conditions();
            let mut writes = if self.full_write {
                self.book.all()
            } else {
                self.book.dirty()
            };
            if writes.is_empty() {
                self.one_at_a_time = false;
                if self.full_write {
                    self.full_write = false;
                    next_heartbeat = Instant::now() + period;
                }
                if self.caller.deadline.is_some() {
                    return Next::Stop;
                }
                let wake = tokio::select! {
                    _ = self.caller.shared.conditions_changed.notified() => Wake::Changes,
                    _ = tokio::time::sleep_until(next_heartbeat) => Wake::Heartbeat,
                    _ = self.caller.shutdown.wait_for(|stop| *stop) => Wake::Shutdown,
                };
                match wake {
                    Wake::Changes => {}
                    Wake::Heartbeat => self.full_write = true,
                    Wake::Shutdown => {
                        self.caller.start_deadline();
                    }
                }
                continue;
            }
            if self.caller.past_deadline() {
                return Next::Stop;
            }
            if self.one_at_a_time {
                writes.truncate(1);
            }
            match self.patch_conditions(&writes).await {
                Ok(()) => {
                    self.book.mark_written(&writes);
                    if self.full_write {
                        self.full_write = false;
                        next_heartbeat = Instant::now() + period;
                    }
                    self.caller.succeeded();
                    self.caller.shared.set_problem(TASK, None);
                }
                Err(err) => match self.on_error(&writes, &err).await {
                    Next::Continue => {}
                    other => return other,
                },
            }
        }
    }

    async fn on_error(&mut self, writes: &[Condition], err: &CallError) -> Next {
        let name = self.name().to_owned();
        match err.class() {
            ErrorClass::NotFound => {
                self.caller.shared.set_problem(
                    TASK,
                    Some(format!(
                        "Node {name} not found (deleted?): reading it again; conditions are \
                         written once it exists"
                    )),
                );
                tracing::warn!(node = %name, "the Node is gone (404): reading it again");
                self.caller.failed("writing node conditions", err).await;
                Next::ReadNode
            }
            ErrorClass::Forbidden => {
                self.caller.shared.set_problem(
                    TASK,
                    Some(format!(
                        "forbidden to patch nodes/{name}/status ({err}): npd's ClusterRole must \
                         grant nodes/status patch"
                    )),
                );
                self.caller.failed("writing node conditions", err).await;
                Next::Continue
            }
            ErrorClass::Rejected | ErrorClass::Conflict if writes.len() > 1 => {
                // One of them is refused: find it by writing the changed ones one at a time
                // (this round's heartbeat refresh of the others is skipped).
                self.one_at_a_time = true;
                self.full_write = false;
                Next::Continue
            }
            ErrorClass::Rejected | ErrorClass::Conflict => {
                let c = &writes[0];
                let counter = &self.caller.shared.counters.condition_writes_rejected;
                counter.inc();
                let rejected = counter.get();
                tracing::warn!(
                    condition = %c.type_,
                    status = c.status.as_str(),
                    reason = %c.reason,
                    error = %err,
                    rejected,
                    "the API server rejected this condition; dropped (not retried)"
                );
                // Dropped: not written, and not tried again until it changes.
                self.book.mark_written(writes);
                Next::Continue
            }
            ErrorClass::Transient => {
                self.caller.failed("writing node conditions", err).await;
                Next::Continue
            }
        }
    }

    /// Logs what could not be written before stopping.
    fn stop(&mut self) {
        self.take_conditions();
        let unwritten: Vec<String> = self.book.dirty().into_iter().map(|c| c.type_).collect();
        if unwritten.is_empty() {
            tracing::info!("Kubernetes exporter stopped; every condition written");
        } else {
            tracing::warn!(
                conditions = %unwritten.join(","),
                "Kubernetes exporter stopped before writing these conditions"
            );
        }
    }

    fn take_conditions(&mut self) {
        let taken = std::mem::take(&mut self.caller.shared.lock().conditions);
        for c in taken.into_values() {
            self.book.set(c);
        }
    }

    /// Writes these conditions to the Node's status, leaving every other condition alone.
    async fn patch_conditions(&self, conditions: &[Condition]) -> Result<(), CallError> {
        let now = std::time::SystemTime::now();
        let conditions: Vec<serde_json::Value> = conditions
            .iter()
            .map(|c| node_condition_json(c, now))
            .collect();
        // Node status conditions merge by `type` (patchMergeKey): a strategic-merge patch
        // changes exactly the listed types.
        let patch = serde_json::json!({ "status": { "conditions": conditions } });
        let params = patch_params();
        self.caller
            .call(
                ApiCall::PatchNodeStatus,
                self.nodes
                    .patch_status(self.name(), &params, &Patch::Strategic(&patch)),
            )
            .await
            .map(drop)
    }
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    }
}
