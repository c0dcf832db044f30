//! The process's timer thread: it sleeps until the earliest moment a worker's board (see
//! `board.rs`) asked to be looked at, and then wakes that worker's scanner task.
//!
//! What is shared, and why: each worker publishes one moment (`Worker::due`, written by
//! that worker only, when it moves earlier or after a scan, not per request under a steady
//! load) and this thread publishes when it will next wake on its own (`planned`). A worker
//! that publishes a moment earlier than `planned` unparks this thread (a futex wake: about
//! once per idle-to-busy turn of a worker, or per shorter deadline than any waiting).
//! Both sides store, then load the other's value, sequentially consistent: whichever
//! stores second sees the first's store, so a due moment is never slept through.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::thread::Thread;
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

/// "Nothing waits": no moment to wake at.
pub(super) const NEVER: u64 = u64::MAX;

/// Nanoseconds from the process's timer epoch to `at` (0 for an earlier instant: it is
/// due at once), below [`NEVER`].
pub(super) fn nanos(at: Instant) -> u64 {
    let since = at.saturating_duration_since(*EPOCH.get_or_init(Instant::now));
    u64::try_from(since.as_nanos()).map_or(NEVER - 1, |n| n.min(NEVER - 1))
}

/// The instant `nanos` after the timer epoch ([`nanos`]'s inverse for the instants after
/// the epoch).
pub(super) fn instant(nanos: u64) -> Instant {
    *EPOCH.get_or_init(Instant::now) + Duration::from_nanos(nanos)
}

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// What a worker and the timer thread share.
pub(super) struct Worker {
    /// When the worker's board next needs a look (see [`nanos`]), or [`NEVER`]. Set by
    /// the worker; set to [`NEVER`] by the timer thread when it hands the look over.
    due: AtomicU64,
    /// The look was handed over and not taken yet.
    kicked: AtomicBool,
    /// The worker's scanner task.
    scanner: AtomicWaker,
}

impl Worker {
    /// Puts a new worker under the timer thread (starting it if it is the first).
    pub(super) fn join() -> Arc<Worker> {
        let w = Arc::new(Worker {
            due: AtomicU64::new(NEVER),
            kicked: AtomicBool::new(false),
            scanner: AtomicWaker::new(),
        });
        ticker()
            .workers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&w));
        w
    }

    /// Asks for a look at `due` (the worker's own thread only).
    pub(super) fn publish(&self, due: u64) {
        self.due.store(due, SeqCst);
        let t = ticker();
        if due < t.planned.load(SeqCst) {
            t.thread.unpark();
        }
    }

    /// Takes a handed-over look, or registers the scanner to be woken for the next one.
    pub(super) fn take_kick(&self, scanner: &std::task::Waker) -> bool {
        self.scanner.register(scanner);
        self.kicked.swap(false, SeqCst)
    }
}

struct Ticker {
    /// The workers (dropped ones are pruned on the next pass).
    workers: Mutex<Vec<Weak<Worker>>>,
    /// When this thread will wake on its own next (see [`nanos`]), or [`NEVER`].
    planned: AtomicU64,
    thread: Thread,
}

static TICKER: OnceLock<Ticker> = OnceLock::new();

fn ticker() -> &'static Ticker {
    TICKER.get_or_init(|| {
        let handle = std::thread::Builder::new()
            .name("scp-timer".into())
            .spawn(|| {
                // Set as soon as this closure's caller returns.
                let t = loop {
                    match TICKER.get() {
                        Some(t) => break t,
                        None => std::thread::sleep(Duration::from_millis(1)),
                    }
                };
                run(t)
            })
            .unwrap_or_else(|e| panic!("the timer thread could not start: {e}"));
        Ticker {
            workers: Mutex::new(Vec::new()),
            planned: AtomicU64::new(0),
            thread: handle.thread().clone(),
        }
    })
}

fn run(t: &Ticker) {
    loop {
        let now = nanos(Instant::now());
        let next = pass(t, now);
        t.planned.store(next, SeqCst);
        // A moment published between the pass's read and the store above did not see
        // `next` yet, and may not have unparked this thread: look once more.
        if earliest(t) < next {
            continue;
        }
        match next {
            NEVER => std::thread::park(),
            at => std::thread::park_timeout(Duration::from_nanos(at.saturating_sub(now))),
        }
    }
}

/// Hands the look over to every worker whose moment has come; the earliest moment left.
fn pass(t: &Ticker, now: u64) -> u64 {
    let mut next = NEVER;
    let mut workers = t.workers.lock().unwrap_or_else(PoisonError::into_inner);
    workers.retain(|w| {
        let Some(w) = w.upgrade() else {
            return false;
        };
        let due = w.due.load(SeqCst);
        if due > now {
            next = next.min(due);
        } else if w.due.compare_exchange(due, NEVER, SeqCst, SeqCst).is_ok() {
            // The worker's scan publishes its next moment.
            w.kicked.store(true, SeqCst);
            w.scanner.wake();
        } else {
            // Moved meanwhile: looked at again on the next pass, at once.
            next = now;
        }
        true
    });
    next
}

fn earliest(t: &Ticker) -> u64 {
    let workers = t.workers.lock().unwrap_or_else(PoisonError::into_inner);
    workers
        .iter()
        .filter_map(Weak::upgrade)
        .map(|w| w.due.load(SeqCst))
        .min()
        .unwrap_or(NEVER)
}
