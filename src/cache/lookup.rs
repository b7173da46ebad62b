//! Finding an image the way people name it (reference, id, id prefix, manifest digest), and
//! what follows from finding it: pinning, and removing it from the runtime and the index.

use super::{Cache, CacheError, ImageRecord};
use crate::reference::{ImageId, ImageRef};
use crate::runtime::RuntimeImage;

impl Cache {
    /// Finds an image by reference (`app:1`, `…@sha256:…`), full id (`sha256:…`) or an id prefix
    /// of at least 6 hex digits. The runtime is asked, so a stale index entry is never returned;
    /// the index record is created on the spot for an image the runtime gained behind our back.
    pub async fn find_and_adopt(
        &self,
        image: &str,
    ) -> Result<(RuntimeImage, ImageRecord), CacheError> {
        let key = self.lookup_key(image).await?;
        let found =
            self.runtime
                .image_status(&key)
                .await
                .map_err(|source| CacheError::Runtime {
                    context: format!("looking up {image}"),
                    source,
                })?;
        let Some(rt) = found else {
            return Err(CacheError::NotFound {
                image: image.to_owned(),
            });
        };
        let id = rt.id.clone();
        let rec = match self.off_thread(move |idx| idx.get(&id)).await? {
            Some(rec) => rec,
            None => {
                let now = self.clock.now_ms();
                let (rt2, now2) = (rt.clone(), now);
                // Adopt with a zero use count: set_pinned(false) on an unknown image creates it.
                self.off_thread(move |idx| idx.set_pinned(&rt2, false, now2))
                    .await?
            }
        };
        Ok((rt, rec))
    }

    async fn lookup_key(&self, image: &str) -> Result<String, CacheError> {
        match ImageId::parse(image) {
            Some(ImageId::Full(id)) => {
                // An image id (one lookup), or else the manifest digest `pull` reports (a
                // scan of the index, only for what is not an id).
                let key = id.to_owned();
                if self.off_thread(move |idx| idx.get(&key)).await?.is_some() {
                    return Ok(id.to_owned());
                }
                let suffix = format!("@{id}");
                let by_digest = self
                    .list()
                    .await?
                    .iter()
                    .find(|r| r.digests.iter().any(|d| d.ends_with(&suffix)))
                    .map(|r| r.id.clone());
                return Ok(by_digest.unwrap_or_else(|| id.to_owned()));
            }
            Some(ImageId::Prefix(hex)) => {
                let prefix = format!("sha256:{hex}");
                let matches: Vec<String> = self
                    .list()
                    .await?
                    .iter()
                    .filter(|r| r.id.starts_with(&prefix))
                    .map(|r| r.id.clone())
                    .collect();
                match matches.len() {
                    1 => return Ok(matches[0].clone()),
                    // Not an id here: perhaps a repository named in hex.
                    0 => {}
                    count => {
                        return Err(CacheError::Ambiguous {
                            prefix: image.to_owned(),
                            count,
                        })
                    }
                }
            }
            None => {}
        }
        Ok(ImageRef::parse(image)?.to_string())
    }

    /// Pins or unpins an image; pinned images are never evicted.
    pub async fn set_pinned(&self, image: &str, pinned: bool) -> Result<ImageRecord, CacheError> {
        let (rt, _) = self.find_and_adopt(image).await?;
        let now = self.clock.now_ms();
        Ok(self
            .off_thread(move |idx| idx.set_pinned(&rt, pinned, now))
            .await?)
    }

    /// Takes an image the runtime no longer holds (removed by `remove_image` or through the CRI
    /// endpoint) out of the index and the presence cache, keeping its popularity by name.
    pub async fn drop_removed(&self, id: &str) -> Result<(), CacheError> {
        self.forget_presence(id);
        let id = id.to_owned();
        let now = self.clock.now_ms();
        self.off_thread(move |idx| idx.remove(&id, now)).await?;
        Ok(())
    }

    /// Removes an image from the runtime, then from the index. A crash between the two leaves a
    /// stale entry that the next reconciliation removes.
    pub async fn remove_image(&self, image: &str) -> Result<ImageRecord, CacheError> {
        let (rt, rec) = self.find_and_adopt(image).await?;
        self.runtime
            .remove_image(&rt.id)
            .await
            .map_err(|source| CacheError::Runtime {
                context: format!("removing {image}"),
                source,
            })?;
        self.drop_removed(&rt.id).await?;
        Ok(rec)
    }
}
