//! cimage: image pre-pull and cache management for compute nodes that run batch jobs in
//! containers through the Kubernetes Container Runtime Interface (CRI).
//!
//! The data path reads one way: [`api`] → [`policy`] → [`puller`] → [`cache`]. Outside systems sit
//! behind small traits with a real implementation and a test double: [`runtime::ImageRuntime`]
//! (CRI ImageService, real one in [`cri`]), [`registry::Registry`] (oci-client) and
//! [`clock::Clock`]. Only [`api`] and [`cri`] speak gRPC. State lives in one [`store`]; every
//! background task is tracked by [`background`] so shutdown can wait for it.

#![warn(missing_docs)]

pub mod api;
pub mod background;
pub mod cache;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod cri;
pub mod expect;
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
