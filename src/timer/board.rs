//! A worker's board of deadlines: the waits of its requests, kept in a slab on the
//! worker's thread, looked over by the worker's scanner task when the timer thread
//! (`ticker.rs`) says the earliest one has come.
//!
//! Arming a deadline writes a slot and, only when it is the earliest the board knows,
//! tells the timer thread (an atomic store). Dropping one frees its slot. Neither touches
//! the runtime's timer wheel, so a worker whose requests all end in time never has a
//! timer armed there: its runtime parks without reading the clock first.
//!
//! The moment the board publishes may be earlier than any deadline still armed (a request
//! that ended since): the scan at that moment finds nothing due and publishes the earliest
//! one left. Under a steady load that is one scan per timeout period.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use super::ticker::{nanos, Worker, NEVER};

struct Slot {
    /// The deadline (see [`nanos`]).
    at: u64,
    /// The task waiting on it; `None` for a free slot, or one fired.
    waker: Option<Waker>,
    fired: bool,
}

struct Board {
    /// Tells this board from an earlier one of the same thread (tests start several).
    id: u32,
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// The moment last published: no later than any armed deadline.
    next: u64,
    worker: Arc<Worker>,
    /// Wakers taken out by a scan, woken once the board is no longer borrowed (reused).
    to_wake: Vec<Waker>,
    scanner: tokio::task::JoinHandle<()>,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// An armed deadline: its board and slot.
#[derive(Clone, Copy)]
pub struct Armed {
    board: u32,
    slot: u32,
}

thread_local! {
    /// This worker's board; `None` on other threads.
    static BOARD: RefCell<Option<Board>> = const { RefCell::new(None) };
}

/// Starts this thread's board and its scanner task (a worker, inside its runtime).
pub fn enable() {
    let worker = Worker::join();
    let scanner = tokio::spawn(scan_when_told(worker.clone()));
    BOARD.with_borrow_mut(|b| {
        *b = Some(Board {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            slots: Vec::new(),
            free: Vec::new(),
            next: NEVER,
            worker,
            to_wake: Vec::new(),
            scanner,
        })
    });
}

/// Drops this thread's board (the waits left on it are never woken: the worker's runtime
/// is ending) and leaves the timer thread.
pub fn disable() {
    if let Some(b) = BOARD.with_borrow_mut(Option::take) {
        b.scanner.abort();
    }
}

/// Arms a deadline at `at` (see [`nanos`]) for the task of `cx`: its slot, or `None` off
/// a worker.
pub fn arm(at: u64, cx: &Context<'_>) -> Option<Armed> {
    BOARD.with_borrow_mut(|b| {
        let b = b.as_mut()?;
        let slot = Slot {
            at,
            waker: Some(cx.waker().clone()),
            fired: false,
        };
        let i = match b.free.pop() {
            Some(i) => {
                b.slots[i as usize] = slot;
                i
            }
            None => {
                b.slots.push(slot);
                u32::try_from(b.slots.len() - 1).expect("fewer than 2^32 deadlines at once")
            }
        };
        if at < b.next {
            b.next = at;
            b.worker.publish(at);
        }
        Some(Armed {
            board: b.id,
            slot: i,
        })
    })
}

/// Whether the deadline armed as `a` has come; if not, the task of `cx` is woken when it does.
pub fn poll(a: Armed, cx: &Context<'_>) -> Poll<()> {
    BOARD.with_borrow_mut(|b| {
        let Some(s) = b
            .as_mut()
            .filter(|b| b.id == a.board)
            .and_then(|b| b.slots.get_mut(a.slot as usize))
        else {
            // The board is gone: the worker is ending and this wait with it.
            return Poll::Pending;
        };
        if s.fired {
            return Poll::Ready(());
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            w => *w = Some(cx.waker().clone()),
        }
        Poll::Pending
    })
}

/// Frees `a`'s slot (its deadline is no longer waited on).
pub fn disarm(a: Armed) {
    // `try_with`: a wait dropped while the thread's locals are being torn down.
    let _ = BOARD.try_with(|b| {
        if let Some(b) = b.borrow_mut().as_mut().filter(|b| b.id == a.board) {
            if let Some(s) = b.slots.get_mut(a.slot as usize) {
                s.waker = None;
                s.fired = true;
                b.free.push(a.slot);
            }
        }
    });
}

/// The worker's scanner: looks the board over each time the timer thread says so.
async fn scan_when_told(worker: Arc<Worker>) {
    loop {
        std::future::poll_fn(|cx| {
            if worker.take_kick(cx.waker()) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await;
        scan(nanos(Instant::now()));
    }
}

/// Fires every armed deadline up to `now` and publishes the earliest one left.
fn scan(now: u64) {
    let mut to_wake = BOARD.with_borrow_mut(|b| {
        let b = b.as_mut()?;
        let mut to_wake = std::mem::take(&mut b.to_wake);
        let mut next = NEVER;
        for s in &mut b.slots {
            if s.fired {
                continue;
            }
            if s.at <= now {
                s.fired = true;
                to_wake.extend(s.waker.take());
            } else {
                next = next.min(s.at);
            }
        }
        b.next = next;
        b.worker.publish(next);
        Some(to_wake)
    });
    // Woken with the board free: a waker may do anything, even arm another deadline.
    if let Some(w) = to_wake.as_mut() {
        w.drain(..).for_each(Waker::wake);
    }
    BOARD.with_borrow_mut(|b| {
        if let (Some(b), Some(w)) = (b.as_mut(), to_wake) {
            b.to_wake = w;
        }
    });
}

/// Slots in use on this thread's board (tests).
#[cfg(test)]
pub fn armed() -> usize {
    BOARD.with_borrow(|b| b.as_ref().map_or(0, |b| b.slots.len() - b.free.len()))
}
