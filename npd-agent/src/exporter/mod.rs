//! Exporters: where reports go. Each consumes [`crate::problem::Report`]s in order and never
//! makes the sensor wait.
//!
//! - [`k8s`]: Node conditions and Events through the Kubernetes API.

pub mod k8s;
