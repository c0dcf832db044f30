//! The per-worker connection pool: a thread-local table indexed by [`super::Upstream::id`].
//!
//! Nothing here is shared between threads: a worker checks out and returns its own
//! connections (`Vec::pop` / `Vec::push`), and connections opened by a worker are driven by
//! tasks of that worker. A worker's idle connections past their expiry are dropped by
//! [`sweep`], which each worker calls on a timer; a connection found closed or expired at
//! checkout is dropped there.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};

use super::wire::Wire;
use crate::body::ForwardBody;

/// An idle HTTP/1.1 connection.
struct Idle {
    sender: http1::SendRequest<ForwardBody>,
    wire: Arc<Wire>,
    expires: Instant,
}

#[derive(Default)]
struct Slot {
    /// Most recently used last.
    idle: Vec<Idle>,
    /// The worker's HTTP/2 connection to this backend, when it offered `h2`.
    h2: Option<(http2::SendRequest<ForwardBody>, Arc<Wire>)>,
}

#[derive(Default)]
struct Pool {
    slots: Vec<Slot>,
}

impl Pool {
    fn slot(&mut self, id: usize) -> &mut Slot {
        if self.slots.len() <= id {
            self.slots.resize_with(id + 1, Slot::default);
        }
        &mut self.slots[id]
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// A connection taken from the pool.
pub struct Pooled {
    pub sender: http1::SendRequest<ForwardBody>,
    pub wire: Arc<Wire>,
}

/// The most recently used live HTTP/1.1 connection to backend `id`, if this worker has one
/// that has not expired at `now` (the caller's clock read, moments ago).
pub fn checkout(id: usize, now: Instant) -> Option<Pooled> {
    POOL.with_borrow_mut(|p| {
        let slot = p.slots.get_mut(id)?;
        while let Some(c) = slot.idle.pop() {
            if c.expires > now && !c.sender.is_closed() {
                return Some(Pooled {
                    sender: c.sender,
                    wire: c.wire,
                });
            }
        }
        None
    })
}

/// Returns a connection whose last answer was read to its end. It may be reused for
/// `idle_for` from `since` (when the answer's head arrived: the body's end is later, so the
/// connection expires a little early, never late); beyond `max_idle` idle connections to
/// one backend it is closed instead.
pub fn checkin(id: usize, conn: Pooled, since: Instant, idle_for: Duration, max_idle: usize) {
    if conn.sender.is_closed() || idle_for.is_zero() {
        return;
    }
    let expires = since + idle_for;
    POOL.with_borrow_mut(|p| {
        let slot = p.slot(id);
        if slot.idle.len() < max_idle {
            slot.idle.push(Idle {
                sender: conn.sender,
                wire: conn.wire,
                expires,
            });
        }
    });
}

/// This worker's live HTTP/2 connection to backend `id`.
pub fn h2(id: usize) -> Option<(http2::SendRequest<ForwardBody>, Arc<Wire>)> {
    POOL.with_borrow_mut(|p| {
        let slot = p.slots.get_mut(id)?;
        match &slot.h2 {
            Some((s, _)) if s.is_closed() => {
                slot.h2 = None;
                None
            }
            other => other.clone(),
        }
    })
}

/// Keeps `conn` as this worker's HTTP/2 connection to backend `id`.
pub fn set_h2(id: usize, conn: http2::SendRequest<ForwardBody>, wire: Arc<Wire>) {
    POOL.with_borrow_mut(|p| p.slot(id).h2 = Some((conn, wire)));
}

/// Drops this worker's idle connections that expired or were closed by their backend;
/// returns how many are left.
pub fn sweep() -> usize {
    let now = Instant::now();
    POOL.with_borrow_mut(|p| {
        let mut left = 0;
        for slot in &mut p.slots {
            slot.idle
                .retain(|c| c.expires > now && !c.sender.is_closed());
            left += slot.idle.len();
            if slot.h2.as_ref().is_some_and(|(s, _)| s.is_closed()) {
                slot.h2 = None;
            }
        }
        left
    })
}

/// Idle HTTP/1.1 connections this worker holds to backend `id`.
pub fn idle(id: usize) -> usize {
    POOL.with_borrow(|p| p.slots.get(id).map_or(0, |s| s.idle.len()))
}
