//! Which data-plane worker the current thread is.
//!
//! The data plane runs one thread per worker, each with its own single-threaded runtime
//! (`server`). State that requests write (metric and report shards, backend pools, request
//! id counters) is kept per worker and indexed by [`index`], so that no two threads write
//! the same memory on the request path; readers (the `/metrics` scrape, the report flush)
//! merge the shards. Threads that are not workers (the control thread, tests) share one
//! extra shard, index [`count`].

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Upper bound on workers (shards are sized once, at start).
pub const MAX_WORKERS: usize = 256;

static COUNT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Sets the number of workers; called once at start, before any worker runs.
pub fn set_count(n: usize) {
    COUNT.store(n.clamp(1, MAX_WORKERS), Ordering::Relaxed);
}

/// The number of workers (at least 1 once set; 0 before).
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed)
}

/// Marks the current thread as worker `i`.
pub fn enter(i: usize) {
    INDEX.with(|c| c.set(i));
}

/// The current worker's index, or [`count`] (the shared extra shard) on other threads.
/// Always below [`shards`].
#[inline]
pub fn index() -> usize {
    let i = INDEX.with(Cell::get);
    if i == usize::MAX {
        count()
    } else {
        i
    }
}

/// Shards per-worker structures need: one per worker plus the shared extra one.
pub fn shards() -> usize {
    count() + 1
}

/// Lowers the current thread's scheduling priority to `nice` (Linux threads have their
/// own): background work (the access-log writer, the control thread's flushes) then yields
/// to the workers when a core is contended, without starving (nice 10 still gets about a
/// tenth of a contended core, enough for tens of thousands of log lines a second).
pub fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority take no pointers; a failure only leaves the priority.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let _ = libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
}

/// Puts the current thread in Linux's `SCHED_IDLE` class: it runs only on a core that no
/// normal thread wants, and a worker that wakes up preempts it at once. On an error (or
/// off Linux) the thread's priority is unchanged.
pub fn idle_priority() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    // SAFETY: `param` lives across the call.
    unsafe {
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    #[cfg(not(target_os = "linux"))]
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}
