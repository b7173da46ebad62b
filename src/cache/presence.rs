//! The presence memory: images the runtime recently confirmed, by every name, so that warm
//! requests within `PresenceTtl` skip the runtime round trip. Removals through cimage forget
//! an image at once; reconciliation replaces the whole memory.

use super::Cache;
use crate::runtime::RuntimeImage;

impl Cache {
    /// Notes that the runtime holds `img` now, under each of its names.
    pub fn remember(&self, img: &RuntimeImage) {
        if self.presence_ttl_ms <= 0 {
            return;
        }
        let now = self.clock.now_ms();
        let mut m = self.confirmed.lock().unwrap();
        for name in img
            .repo_tags
            .iter()
            .chain(img.repo_digests.iter())
            .chain(std::iter::once(&img.id))
        {
            m.insert(name.clone(), (img.clone(), now));
        }
    }

    /// The image under `name` if the runtime confirmed it within the presence TTL.
    pub fn recall(&self, name: &str) -> Option<RuntimeImage> {
        let now = self.clock.now_ms();
        let m = self.confirmed.lock().unwrap();
        let (img, at) = m.get(name)?;
        (now - at <= self.presence_ttl_ms).then(|| img.clone())
    }

    /// Forgets every name of image `id` (it was removed, or turned out to be missing).
    pub fn forget_presence(&self, id: &str) {
        self.confirmed
            .lock()
            .unwrap()
            .retain(|_, (img, _)| img.id != id);
    }
}
