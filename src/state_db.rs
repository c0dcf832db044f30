//! The state database (`state.dir/state.redb`): quota counters, hourly usage, report
//! aggregates and the instance id, written by the flushes on the control thread (every
//! second and at shutdown), never on the request path.
//!
//! After an I/O error (a full disk, a failed `fsync`) redb refuses every later transaction
//! of that `Database` (`PreviousIo`) until the file is opened again. So that persistence
//! resumes by itself once the disk recovers, instead of failing every second until a
//! restart (and losing everything counted since at the final flush), a transaction that
//! fails that way closes the database here and the next one opens it again (redb repairs
//! the file on open when a commit was cut short). The stores keep what a failed flush took
//! and write it with the next one.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use redb::{Database, ReadTransaction, WriteTransaction};

type Opener = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

/// What a transaction's body returns on failure: any redb error (`?` converts), boxed
/// (redb's error is large, and a failure is rare).
#[derive(Debug)]
pub struct DbError(Box<redb::Error>);

impl<E: Into<redb::Error>> From<E> for DbError {
    fn from(e: E) -> Self {
        Self(Box::new(e.into()))
    }
}

pub struct StateDb {
    /// Opens (or reopens) the database.
    open: Opener,
    /// `None` once an I/O error closed it; the next transaction reopens it.
    db: RwLock<Option<Database>>,
    /// The file, for messages.
    name: String,
    /// Transactions failed since the last one that succeeded: the log says when writes
    /// start failing, every [`FAILURES_PER_REMINDER`]th failure after that, and when they
    /// resume (the flushes run every second: a line each time would bury everything else).
    failures: AtomicU64,
}

/// Two transactions per flush (quota, reports), one flush a second: a reminder about every
/// 30 s while writes keep failing.
const FAILURES_PER_REMINDER: u64 = 60;

/// An error that leaves the `Database` unusable until it is opened again.
fn needs_reopen(e: &DbError) -> bool {
    let e = &*e.0;
    matches!(e, redb::Error::Io(_) | redb::Error::PreviousIo)
}

impl StateDb {
    /// Opens (creating if needed) the database file at `path`.
    pub fn open(path: &Path) -> Result<Self, String> {
        let owned = path.to_path_buf();
        Self::with_opener(
            path.display().to_string(),
            Box::new(move || Database::create(&owned)),
        )
    }

    /// A database opened by `open` (tests give it a storage backend that fails on demand).
    pub fn with_opener(name: String, open: Opener) -> Result<Self, String> {
        let db = open().map_err(|e| format!("{name}: {e}"))?;
        Ok(Self {
            open,
            db: RwLock::new(Some(db)),
            name,
            failures: AtomicU64::new(0),
        })
    }

    /// The open database, reopened first if an I/O error closed it.
    fn current(&self) -> Result<RwLockReadGuard<'_, Option<Database>>, String> {
        {
            let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
            if db.is_some() {
                return Ok(db);
            }
        }
        {
            let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
            if db.is_none() {
                *db = Some((self.open)().map_err(|e| {
                    self.count_failure(&e);
                    format!(
                        "state database {} could not be opened again: {e}",
                        self.name
                    )
                })?);
                tracing::debug!(file = %self.name, "state database opened again after an I/O error");
            }
        }
        Ok(self.db.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Maps a failed transaction's error; one that makes redb refuse every later transaction
    /// closes the database, so that the next transaction opens it again.
    fn failed(&self, e: DbError) -> String {
        if needs_reopen(&e) {
            let mut db = self.db.write().unwrap_or_else(PoisonError::into_inner);
            db.take();
        }
        self.count_failure(&e.0);
        format!("state database {}: {}", self.name, e.0)
    }

    fn count_failure(&self, e: &dyn std::fmt::Display) {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n == 1 {
            tracing::warn!(file = %self.name, error = %e, "state database writes are failing: quota counters and report aggregates stay in memory and are written once a write succeeds; retrying every second");
        } else if n % FAILURES_PER_REMINDER == 0 {
            tracing::warn!(file = %self.name, error = %e, failed_transactions = n, "state database writes are still failing; nothing is lost while the gateway runs");
        }
    }

    fn succeeded(&self) {
        // A load, not a swap, in the common case: no write to a shared line per flush.
        if self.failures.load(Ordering::Relaxed) > 0 {
            let n = self.failures.swap(0, Ordering::Relaxed);
            tracing::info!(file = %self.name, failed_transactions = n, "state database writes resumed; what was held in memory is written");
        }
    }

    /// Runs `f` on the open database (reopened first if an I/O error closed it) and maps
    /// its failure (see [`Self::failed`]).
    fn with_db<T>(&self, f: impl FnOnce(&Database) -> Result<T, DbError>) -> Result<T, String> {
        let r = {
            let db = self.current()?;
            let Some(db) = db.as_ref() else {
                return Err(format!("state database {} is closed", self.name));
            };
            f(db)
        };
        match r {
            Ok(v) => {
                self.succeeded();
                Ok(v)
            }
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Runs `f` in a read transaction.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<T, DbError>,
    ) -> Result<T, String> {
        self.with_db(|db| f(&db.begin_read()?))
    }

    /// Runs `f` in a write transaction and commits it (nothing of it is kept when `f` or
    /// the commit fails).
    pub fn write<T>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<T, DbError>,
    ) -> Result<T, String> {
        self.with_db(|db| {
            let tx = db.begin_write()?;
            let v = f(&tx)?;
            tx.commit()?;
            Ok(v)
        })
    }
}

/// A storage backend that fails on demand, for the tests of what a failed flush keeps.
#[cfg(test)]
pub mod testing {
    use std::io;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use super::StateDb;

    /// An in-memory disk; while `failing` is set, every write and sync fails as a full
    /// disk does.
    #[derive(Debug, Clone, Default)]
    pub struct FlakyDisk {
        bytes: Arc<Mutex<Vec<u8>>>,
        pub failing: Arc<AtomicBool>,
    }

    impl FlakyDisk {
        fn check(&self) -> io::Result<()> {
            if self.failing.load(Ordering::SeqCst) {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    "no space left on device (test)",
                ));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for FlakyDisk {
        fn len(&self) -> io::Result<u64> {
            Ok(self.bytes.lock().unwrap().len() as u64)
        }

        fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
            let b = self.bytes.lock().unwrap();
            let start = offset as usize;
            b.get(start..start + len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            self.check()?;
            self.bytes.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }

        fn sync_data(&self, _eventual: bool) -> io::Result<()> {
            self.check()
        }

        fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.check()?;
            let mut b = self.bytes.lock().unwrap();
            let start = offset as usize;
            if b.len() < start + data.len() {
                b.resize(start + data.len(), 0);
            }
            b[start..start + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    /// Runs `flush` on this thread and on another at the same moment (a barrier lines them
    /// up), as the periodic flush and the final one at shutdown may run. Returns once this
    /// thread's has returned, with the other thread to join after the caller's check.
    pub fn flush_twice_at_once(
        flush: impl Fn() + Send + Sync + 'static,
    ) -> std::thread::JoinHandle<()> {
        let flush = Arc::new(flush);
        let both = Arc::new(std::sync::Barrier::new(2));
        let other = {
            let (flush, both) = (flush.clone(), both.clone());
            std::thread::spawn(move || {
                both.wait();
                flush();
            })
        };
        both.wait();
        flush();
        other
    }

    /// A state database on a [`FlakyDisk`], and the disk's failure switch.
    pub fn flaky_db() -> (StateDb, Arc<AtomicBool>) {
        let disk = FlakyDisk::default();
        let failing = disk.failing.clone();
        let db = StateDb::with_opener(
            "flaky (test)".into(),
            Box::new(move || redb::Builder::new().create_with_backend(disk.clone())),
        )
        .unwrap();
        (db, failing)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use redb::{ReadableTable, TableDefinition};

    use super::testing::flaky_db;

    const T: TableDefinition<&str, u64> = TableDefinition::new("t");

    fn put(db: &super::StateDb, k: &str, v: u64) -> Result<(), String> {
        db.write(|tx| {
            tx.open_table(T)?.insert(k, v)?;
            Ok(())
        })
    }

    fn get(db: &super::StateDb, k: &str) -> Option<u64> {
        db.read(|tx| Ok(tx.open_table(T)?.get(k)?.map(|v| v.value())))
            .unwrap()
    }

    /// A failed commit leaves redb refusing every transaction (`PreviousIo`) until the file
    /// is opened again: the state database does that by itself, so that writes resume once
    /// the disk recovers, with what was committed before the failure intact.
    #[test]
    fn writes_resume_after_the_disk_recovers() {
        let (db, failing) = flaky_db();
        put(&db, "before", 1).unwrap();
        failing.store(true, Ordering::SeqCst);
        let e = put(&db, "during", 2).unwrap_err();
        assert!(e.contains("no space left"), "{e}");
        failing.store(false, Ordering::SeqCst);
        put(&db, "after", 3).unwrap();
        assert_eq!(get(&db, "before"), Some(1));
        assert_eq!(
            get(&db, "during"),
            None,
            "a failed transaction keeps nothing"
        );
        assert_eq!(get(&db, "after"), Some(3));
        let keys = db.read(|tx| Ok(tx.open_table(T)?.iter()?.count())).unwrap();
        assert_eq!(keys, 2);
    }
}
