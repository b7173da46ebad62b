//! The checks around a step's container as it is made, which hold a step to the rights of its
//! host user whatever its image says: before its creation, the image's own volumes (for a step
//! as a user); before its start, the spec the runtime generated read back (identity, `/etc`,
//! where every mount lands); after its start, its first process's credentials as the host
//! sees them, a second line behind the first two (the process is killed on any difference).

use std::time::Duration;

use tracing::{debug, warn};

use super::landing::{check_landings, check_no_volume};
use super::readback::{self, ReadBackRefusal};
use super::request::Identity;
use super::Launcher;
use crate::runtime::MountSpec;

/// What a step's container is checked against: who it runs as, the mounts cimage asked for,
/// and the image (its name for messages, its id for the runtime).
pub(super) struct Confinement<'a> {
    /// The host identity the step runs as.
    pub(super) identity: &'a Identity,
    /// The mounts cimage asked for: the request's staged mounts and the identity files.
    pub(super) ours: &'a [MountSpec],
    /// The image as the task names it.
    pub(super) image: &'a str,
}

impl Confinement<'_> {
    fn as_user(&self) -> bool {
        self.identity.uid != 0
    }
}

impl Launcher {
    /// Before the container of a step as a user is created from `image_id`: refuses an image
    /// that declares volumes unless the runtime says it does not create them (containerd 1.6
    /// does by default, and mounts them after cimage's files). Returns the volumes, to confirm
    /// after the creation that none was mounted.
    pub(super) async fn check_image_volumes(
        &self,
        c: &Confinement<'_>,
        image_id: &str,
    ) -> Result<Vec<String>, ReadBackRefusal> {
        if !c.as_user() {
            return Ok(Vec::new());
        }
        let unasked = |what: &'static str| move |source| ReadBackRefusal::Unasked { what, source };
        let volumes = self
            .rt
            .image_volumes(image_id)
            .await
            .map_err(unasked("which volumes the image declares"))?;
        let Some(volumes) = volumes else {
            warn!(
                image = c.image,
                "the runtime does not say which volumes the image declares"
            );
            return Ok(Vec::new());
        };
        if volumes.is_empty() {
            return Ok(volumes);
        }
        let creates = self
            .rt
            .creates_image_volumes()
            .await
            .map_err(unasked("whether it creates image volumes"))?;
        readback::check_volumes(c.image, &volumes, creates)?;
        Ok(volumes)
    }

    /// Reads back created container `cid` before its start: the identity the runtime would
    /// give its process, and for a step as a user the image's `/etc`, that none of the image's
    /// `volumes` was mounted, and where every mount lands.
    pub(super) async fn read_back(
        &self,
        c: &Confinement<'_>,
        cid: &str,
        volumes: &[String],
    ) -> Result<(), ReadBackRefusal> {
        let created = self
            .rt
            .inspect_created(cid, c.as_user())
            .await
            .map_err(|source| ReadBackRefusal::Unreadable {
                cid: cid.to_owned(),
                source,
            })?;
        readback::check_identity(cid, created.identity, c.identity)?;
        readback::check_etc(created.etc, c.image)?;
        if c.as_user() {
            check_no_volume(&created.mounts, c.ours, volumes, c.image)?;
            check_landings(&created.mounts, c.ours, c.image)?;
        }
        Ok(())
    }

    /// After the start of a step as a user: its first process's credentials on the host must
    /// be the step's; on any difference the container is killed and the refusal returned. A
    /// process that already exited, or that the runtime does not name, is not checked (that
    /// is logged).
    pub(super) async fn check_started(
        &self,
        c: &Confinement<'_>,
        cid: &str,
    ) -> Result<(), ReadBackRefusal> {
        if !c.as_user() {
            return Ok(());
        }
        let process = match self.rt.container_process(cid).await {
            Ok(Some(p)) => p,
            Ok(None) => {
                warn!(
                    container = cid,
                    "the step's process was gone before its groups could be checked on the host"
                );
                return Ok(());
            }
            Err(e) => {
                warn!(
                    container = cid,
                    "cannot check the step's groups on the host: {e}"
                );
                return Ok(());
            }
        };
        let checked = readback::check_process(&process, c.identity);
        match &checked {
            Ok(()) => debug!(
                container = cid,
                pid = process.pid,
                "the step's process has its host credentials and groups"
            ),
            Err(_) => {
                if let Err(e) = self.rt.stop_container(cid, Duration::ZERO).await {
                    warn!(container = cid, "killing the step failed: {e}");
                }
            }
        }
        checked
    }
}
