//! The daemon's one durable store: a single redb file (`StateDir/index.redb`) shared by the image
//! index, the launcher's jobs and tasks, and the pre-warm schedules and runs.
//!
//! Owning the [`redb::Database`] here gives every module the same three things: typed tables of
//! JSON records ([`JsonTable`]), transactions that name what they were doing when they fail
//! ([`StoreError`]), and one way to run blocking database work off the async workers
//! ([`Store::off_thread`]; commits fsync). Every change is one write transaction committed with
//! redb's default (immediate) durability before anyone is answered, so a crash leaves either the
//! old or the new state, never a torn one.

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction,
};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A failure of the store, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("state database: {context}: {source}")]
pub struct StoreError {
    /// What was being done, e.g. `saving task 3f2a…`.
    pub context: String,
    /// The underlying error (redb, JSON decoding, or the worker thread).
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl StoreError {
    /// A store error from any cause.
    pub fn new(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            context: context.into(),
            source: source.into(),
        }
    }
}

/// Maps a redb error to a [`StoreError`] with `context`.
fn ctx<E: Into<redb::Error>>(context: &str) -> impl FnOnce(E) -> StoreError + '_ {
    move |e| StoreError::new(context, e.into())
}

/// A table of JSON records keyed by string. The type parameter is the record type, so a table
/// can only be written and read as what it holds.
pub struct JsonTable<T> {
    name: &'static str,
    _record: PhantomData<fn() -> T>,
}

impl<T> Clone for JsonTable<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for JsonTable<T> {}

impl<T> JsonTable<T> {
    /// The table called `name` in the file.
    pub const fn new(name: &'static str) -> Self {
        Self {
            name,
            _record: PhantomData,
        }
    }

    fn def(&self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(self.name)
    }
}

/// redb's page cache. Its default is a gigabyte, which a daemon beside the jobs of a compute
/// node must not take: the working set (live tasks, the image index) is far smaller.
const CACHE_BYTES: usize = 16 << 20;

/// The string-to-string table of store-wide facts (the daemon's instance id, salts).
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");

fn decode<T: DeserializeOwned>(table: &str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::new(format!("decoding {table}/{key}"), e))
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records are plain data and always serialise")
}

/// The store. Cheap to clone (one shared database).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
    instance: Arc<str>,
}

/// The open database and where it lives. redb refuses every further read and write once a
/// write failed on I/O (a full disk, say), so after one the database is closed and opened
/// again here, in-process: the failed write is lost (it never committed), and the next
/// requests find the file as it was before it.
struct Inner {
    path: PathBuf,
    db: RwLock<Option<Arc<Database>>>,
    /// Write transactions committed since the store was opened.
    writes: std::sync::atomic::AtomicU64,
}

/// How long a reopen waits for transactions still holding the failed database.
const REOPEN_WAIT: Duration = Duration::from_secs(2);

fn open_database(path: &Path) -> Result<Database, StoreError> {
    let what = format!("opening {}", path.display());
    redb::Builder::new()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::new(
                what.clone(),
                "the file is open in another process (is another cimaged running with the same StateDir?)",
            ),
            other => StoreError::new(what.clone(), redb::Error::from(other)),
        })
}

impl StoreError {
    /// Whether the database failed on I/O (after which redb refuses everything until reopened).
    pub fn is_io(&self) -> bool {
        self.source
            .downcast_ref::<redb::Error>()
            .is_some_and(|e| matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo))
    }
}

impl Store {
    /// Opens (or creates) the store file. Fails with a clear message when another process holds
    /// it (two daemons with one `StateDir`).
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = open_database(path)?;
        let mut store = Self {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                db: RwLock::new(Some(Arc::new(db))),
                writes: std::sync::atomic::AtomicU64::new(0),
            }),
            instance: Arc::from(""),
        };
        let instance =
            store.meta_or_init("instance", || format!("{:016x}", rand::random::<u64>()))?;
        store.instance = Arc::from(instance);
        Ok(store)
    }

    /// The open database, opened again first if an I/O failure closed it.
    fn database(&self, context: &str) -> Result<Arc<Database>, StoreError> {
        if let Some(db) = self.inner.db.read().unwrap().as_ref() {
            return Ok(Arc::clone(db));
        }
        let mut slot = self.inner.db.write().unwrap();
        if let Some(db) = slot.as_ref() {
            return Ok(Arc::clone(db));
        }
        let db = Arc::new(open_database(&self.inner.path).map_err(|e| {
            StoreError::new(
                format!(
                    "{context}: {} is unavailable since an I/O error (reopening it failed)",
                    self.inner.path.display()
                ),
                e.source,
            )
        })?);
        tracing::info!(path = %self.inner.path.display(), "state database reopened after an I/O error");
        *slot = Some(Arc::clone(&db));
        Ok(db)
    }

    /// After an I/O failure of `failed` (the caller has let go of its handle): closes the
    /// database, once the transactions still holding it are done, and opens it again.
    fn reopen(&self, failed: *const Database) {
        let old = {
            let mut slot = self.inner.db.write().unwrap();
            match slot.as_ref() {
                Some(db) if Arc::as_ptr(db) == failed => slot.take(),
                // Another caller got here first.
                _ => return,
            }
        };
        let Some(mut old) = old else { return };
        let deadline = std::time::Instant::now() + REOPEN_WAIT;
        loop {
            match Arc::try_unwrap(old) {
                Ok(db) => {
                    drop(db);
                    break;
                }
                Err(still) if std::time::Instant::now() < deadline => {
                    old = still;
                    std::thread::sleep(Duration::from_millis(5));
                }
                // Still held: it closes when its last user lets go; the next request reopens.
                Err(_) => return,
            }
        }
        if let Err(e) = self.database("reopening") {
            tracing::warn!("{e}");
        }
    }

    /// `e` with the database's path, after reopening the database if it was an I/O failure.
    fn failed(&self, db: Arc<Database>, e: StoreError) -> StoreError {
        if !e.is_io() {
            return e;
        }
        let failed = Arc::as_ptr(&db);
        drop(db);
        tracing::warn!(path = %self.inner.path.display(), "state database I/O error: {e}; reopening it");
        self.reopen(failed);
        StoreError {
            context: format!("{} ({})", e.context, self.inner.path.display()),
            source: e.source,
        }
    }

    /// This daemon's instance id, made once when the store is created. Pods and containers carry
    /// it as a label, so that several daemons sharing one runtime never touch each other's.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// Creates the tables if they do not exist yet, so that later read transactions find them.
    pub fn ensure_tables<T>(&self, tables: &[JsonTable<T>]) -> Result<(), StoreError> {
        self.write("creating tables", |w| {
            for t in tables {
                w.tx.open_table(t.def()).map_err(ctx(w.context))?;
            }
            Ok(())
        })
    }

    /// The value of a store-wide fact, made by `make` and saved on first use.
    pub fn meta_or_init(
        &self,
        key: &str,
        make: impl FnOnce() -> String,
    ) -> Result<String, StoreError> {
        let context = format!("reading meta/{key}");
        self.write(&context, |w| {
            let mut meta = w.tx.open_table(META).map_err(ctx(w.context))?;
            let existing = meta
                .get(key)
                .map_err(ctx(w.context))?
                .map(|v| v.value().to_owned());
            match existing {
                Some(v) => Ok(v),
                None => {
                    let v = make();
                    meta.insert(key, v.as_str()).map_err(ctx(w.context))?;
                    Ok(v)
                }
            }
        })
    }

    /// Runs `f` in one write transaction and commits it; nothing is written if `f` fails.
    pub fn write<R>(
        &self,
        context: &str,
        f: impl FnOnce(&Write<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let db = self.database(context)?;
        let result = (|| {
            let tx = db.begin_write().map_err(ctx(context))?;
            let out = f(&Write { tx: &tx, context })?;
            tx.commit().map_err(ctx(context))?;
            self.inner
                .writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(out)
        })();
        result.map_err(|e| self.failed(db, e))
    }

    /// Write transactions committed so far: a cache of something read from the store is
    /// current while this has not moved.
    pub fn writes(&self) -> u64 {
        self.inner.writes.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Runs `f` over one consistent read snapshot.
    pub fn read<R>(
        &self,
        context: &str,
        f: impl FnOnce(&Read<'_>) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let db = self.database(context)?;
        let result = (|| {
            let tx = db.begin_read().map_err(ctx(context))?;
            f(&Read { tx: &tx, context })
        })();
        result.map_err(|e| self.failed(db, e))
    }

    /// One record.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: JsonTable<T>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.read(&format!("reading {}/{key}", table.name), |r| {
            r.get(table, key)
        })
    }

    /// Every record of a table, in key order.
    pub fn all<T: DeserializeOwned>(&self, table: JsonTable<T>) -> Result<Vec<T>, StoreError> {
        self.read(&format!("listing {}", table.name), |r| {
            Ok(r.all(table)?.into_iter().map(|(_, v)| v).collect())
        })
    }

    /// Saves one record in a transaction of its own.
    pub fn put<T: Serialize>(
        &self,
        table: JsonTable<T>,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        self.write(&format!("saving {}/{key}", table.name), |w| {
            w.put(table, key, value)
        })
    }

    /// Runs blocking store work on the blocking pool, over a cheap clone of `state` (a store or
    /// a module's wrapper of one). redb commits fsync: they must not stall the async workers.
    pub async fn off_thread<S, T>(
        state: S,
        f: impl FnOnce(&S) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError>
    where
        S: Send + 'static,
        T: Send + 'static,
    {
        tokio::task::spawn_blocking(move || f(&state))
            .await
            .unwrap_or_else(|e| Err(StoreError::new("database worker", e)))
    }
}

/// An open write transaction, with typed access to [`JsonTable`]s.
pub struct Write<'a> {
    tx: &'a WriteTransaction,
    context: &'a str,
}

impl Write<'_> {
    /// One record.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: JsonTable<T>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let t = self.tx.open_table(table.def()).map_err(ctx(self.context))?;
        let v = t.get(key).map_err(ctx(self.context))?;
        v.map(|v| decode(table.name, key, v.value())).transpose()
    }

    /// Inserts or replaces one record.
    pub fn put<T: Serialize>(
        &self,
        table: JsonTable<T>,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(table.def()).map_err(ctx(self.context))?;
        t.insert(key, encode(value).as_slice())
            .map_err(ctx(self.context))?;
        Ok(())
    }

    /// Removes one record; true if it existed.
    pub fn remove<T>(&self, table: JsonTable<T>, key: &str) -> Result<bool, StoreError> {
        let mut t = self.tx.open_table(table.def()).map_err(ctx(self.context))?;
        let existed = t.remove(key).map_err(ctx(self.context))?.is_some();
        Ok(existed)
    }

    /// Every record of a table with its key, in key order.
    pub fn all<T: DeserializeOwned>(
        &self,
        table: JsonTable<T>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let t = self.tx.open_table(table.def()).map_err(ctx(self.context))?;
        collect(
            table.name,
            t.iter().map_err(ctx(self.context))?,
            self.context,
            None,
        )
    }

    /// A store-wide fact.
    pub fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        let t = self.tx.open_table(META).map_err(ctx(self.context))?;
        let v = t.get(key).map_err(ctx(self.context))?;
        Ok(v.map(|v| v.value().to_owned()))
    }

    /// Sets a store-wide fact.
    pub fn set_meta(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let mut t = self.tx.open_table(META).map_err(ctx(self.context))?;
        t.insert(key, value).map_err(ctx(self.context))?;
        Ok(())
    }

    /// The keys that start with `prefix`, in order.
    pub fn keys_with_prefix<T>(
        &self,
        table: JsonTable<T>,
        prefix: &str,
    ) -> Result<Vec<String>, StoreError> {
        let t = self.tx.open_table(table.def()).map_err(ctx(self.context))?;
        let mut out = Vec::new();
        for entry in t.range(prefix..).map_err(ctx(self.context))? {
            let (k, _) = entry.map_err(ctx(self.context))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push(k.value().to_owned());
        }
        Ok(out)
    }
}

/// An open read snapshot, with typed access to [`JsonTable`]s. A table never written reads as
/// empty.
pub struct Read<'a> {
    tx: &'a ReadTransaction,
    context: &'a str,
}

impl Read<'_> {
    /// One record.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: JsonTable<T>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let t = match self.tx.open_table(table.def()) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(ctx(self.context)(e)),
        };
        let v = t.get(key).map_err(ctx(self.context))?;
        v.map(|v| decode(table.name, key, v.value())).transpose()
    }

    /// Every record of a table with its key, in key order.
    pub fn all<T: DeserializeOwned>(
        &self,
        table: JsonTable<T>,
    ) -> Result<Vec<(String, T)>, StoreError> {
        self.scan(table, None, usize::MAX)
    }

    /// How many records a table holds.
    pub fn len<T>(&self, table: JsonTable<T>) -> Result<u64, StoreError> {
        use redb::ReadableTableMetadata;
        match self.tx.open_table(table.def()) {
            Ok(t) => t.len().map_err(ctx(self.context)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(ctx(self.context)(e)),
        }
    }

    /// The first `n` records of a table, in key order (a bounded read of a long table).
    pub fn first<T: DeserializeOwned>(
        &self,
        table: JsonTable<T>,
        n: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        self.scan(table, None, n)
    }

    /// The records whose keys start with `prefix`, in key order.
    pub fn with_prefix<T: DeserializeOwned>(
        &self,
        table: JsonTable<T>,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        self.scan(table, Some(prefix), usize::MAX)
    }

    fn scan<T: DeserializeOwned>(
        &self,
        table: JsonTable<T>,
        prefix: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let t = match self.tx.open_table(table.def()) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(ctx(self.context)(e)),
        };
        let range = t.range(prefix.unwrap_or("")..).map_err(ctx(self.context))?;
        collect(table.name, range.take(limit), self.context, prefix)
    }
}

/// Decodes a range of entries, stopping at the first key without `prefix`.
fn collect<'x, T: DeserializeOwned>(
    table: &str,
    entries: impl Iterator<
        Item = Result<
            (
                redb::AccessGuard<'x, &'static str>,
                redb::AccessGuard<'x, &'static [u8]>,
            ),
            redb::StorageError,
        >,
    >,
    context: &str,
    prefix: Option<&str>,
) -> Result<Vec<(String, T)>, StoreError> {
    let mut out = Vec::new();
    for entry in entries {
        let (k, v) = entry.map_err(ctx(context))?;
        let key = k.value();
        if prefix.is_some_and(|p| !key.starts_with(p)) {
            break;
        }
        out.push((key.to_owned(), decode(table, key, v.value())?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: JsonTable<Vec<u32>> = JsonTable::new("t");

    #[test]
    fn typed_records_transactions_and_meta() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let s = Store::open(&path).unwrap();
        assert!(
            s.all(T).unwrap().is_empty(),
            "an unwritten table reads as empty"
        );
        s.put(T, "a\u{0}1", &vec![1]).unwrap();
        s.put(T, "a\u{0}2", &vec![2]).unwrap();
        s.put(T, "b", &vec![3]).unwrap();
        assert_eq!(s.get(T, "b").unwrap(), Some(vec![3]));
        let a = s.read("t", |r| r.with_prefix(T, "a\u{0}")).unwrap();
        assert_eq!(a.len(), 2);
        // A failing transaction writes nothing.
        let e = s
            .write("failing", |w| {
                w.remove(T, "b")?;
                Err::<(), _>(StoreError::new("failing", "on purpose"))
            })
            .unwrap_err();
        assert_eq!(e.to_string(), "state database: failing: on purpose");
        assert_eq!(s.get(T, "b").unwrap(), Some(vec![3]));
        let id = s.meta_or_init("instance", || "x1".into()).unwrap();
        assert_eq!(s.meta_or_init("instance", || "x2".into()).unwrap(), id);
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.all(T).unwrap().len(), 3);
        let second = Store::open(&path);
        assert!(second.err().unwrap().to_string().contains("another"));
    }
}
