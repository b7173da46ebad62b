//! A map of things made for keys that requests name (registry hosts, credentials), bounded so
//! that what callers name cannot grow the daemon: full, it is cleared before a new key goes in.
//! Clearing (rather than evicting one entry) keeps it trivially cheap; every entry is a cache
//! that is made again on a miss. It lives here, at the lowest layer its users (credentials,
//! registry) share.

use std::collections::HashMap;
use std::hash::Hash;

/// A `HashMap` of at most `cap` entries, cleared when a new key would pass the cap.
#[derive(Debug)]
pub struct BoundedMap<K, V> {
    cap: usize,
    map: HashMap<K, V>,
}

impl<K: Hash + Eq, V> BoundedMap<K, V> {
    /// An empty map of at most `cap` entries.
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            map: HashMap::new(),
        }
    }

    /// The value under `k`.
    pub fn get(&self, k: &K) -> Option<&V> {
        self.map.get(k)
    }

    /// Puts `v` under `k`, clearing the map first when `k` is new and the map is full.
    pub fn insert(&mut self, k: K, v: V) {
        if self.map.len() >= self.cap && !self.map.contains_key(&k) {
            self.map.clear();
        }
        self.map.insert(k, v);
    }

    /// Takes the value under `k` out.
    pub fn remove(&mut self, k: &K) -> Option<V> {
        self.map.remove(k)
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_keyed_by_what_requests_name_stay_bounded() {
        let mut m = BoundedMap::new(3);
        for i in 0..10 {
            m.insert(format!("reg{i}.example"), i);
            assert!(m.len() <= 3);
        }
        // Replacing a key already there keeps the others.
        let before = m.len();
        m.insert("reg9.example".to_owned(), 99);
        assert_eq!(m.get(&"reg9.example".to_owned()), Some(&99));
        assert_eq!(m.len(), before);
    }
}
