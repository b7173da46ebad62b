//! cimage: image pre-pull and cache management for compute nodes that run batch jobs in
//! containers through the Kubernetes Container Runtime Interface (CRI).
//!
//! A request reads one way, down the layers: [`api`] takes it (the caller from the socket's
//! peer credentials) and hands it to the [`launcher`] (job steps), [`prewarm`] (schedules),
//! [`expect`] (images announced for coming jobs) or straight to the [`puller`]; the puller
//! applies the pull decision of [`policy`], pulls once per image and credentials through the
//! runtime, and records the use in the [`cache`], the index over the runtime's images. Outside
//! systems sit behind small traits with a real implementation and a test double:
//! [`runtime::ImageRuntime`] and [`runtime::TaskRuntime`] (CRI, real ones in [`cri`]),
//! [`registry::Registry`] (cimage's own HTTP client, reqwest, with oci-client for the token
//! step) and [`clock::Clock`]. Only [`api`] and [`cri`] speak gRPC. State lives in one
//! [`store`]; every background task is tracked by [`background`] so shutdown can wait for it.
//! `tests/layers.rs` holds the layers and fails on an import that points up or sideways.

#![warn(missing_docs)]

pub mod api;
pub mod background;
pub mod cache;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod cri;
pub mod expect;
pub mod fetch;
pub mod identity;
pub mod launcher;
pub mod metrics;
pub mod names;
pub mod policy;
pub mod prewarm;
pub mod puller;
pub mod reference;
pub mod registry;
pub mod runtime;
pub mod store;
#[cfg(test)]
mod testing;
pub mod units;
