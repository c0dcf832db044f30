//! The worker's connection watchdog: one task per worker checks every connection of that
//! worker on a coarse tick and tells the ones to close that must.
//!
//! hyper's own `header_read_timeout` also runs while a keep-alive connection waits for its
//! next request (and arms a timer per request), which would cut idle connections at the
//! head timeout. Instead each connection has an [`Activity`] record, fed by its socket and
//! its requests with plain stores, and this watchdog reads them: no timer, no wake-up and
//! no extra future per connection or per request. Every tick (a quarter of the shorter of
//! `limits.head_read_timeout` and `limits.idle_timeout`):
//! - a head being read longer than the head timeout is cut (timed from the tick that first
//!   sees it: between the timeout and the timeout plus two ticks after its first byte, so
//!   that a read never needs the clock);
//! - a connection with no request in flight and no byte moved since `limits.idle_timeout`
//!   is closed gracefully (between the idle timeout and the idle timeout plus one tick
//!   after its last byte, never before);
//! - a graceful close that has not finished 5 s later is forced;
//! - at shutdown, every connection is told to close gracefully.
//!
//! Connections register here when they start (a thread-local list: the watchdog and the
//! connections of a worker share its thread) and drop out when their [`Activity`] is gone.

use std::cell::RefCell;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::io::{Activity, Order};
use crate::config::Limits;

/// How long after the graceful close of a connection it is dropped outright.
const FORCE_CLOSE_AFTER: Duration = Duration::from_secs(5);

thread_local! {
    /// Connections started since the watchdog last looked.
    static NEW: RefCell<Vec<Weak<Activity>>> = const { RefCell::new(Vec::new()) };
}

/// Puts a new connection of this worker under the watchdog.
pub fn register(a: &Arc<Activity>) {
    NEW.with_borrow_mut(|n| n.push(Arc::downgrade(a)));
}

/// What the watchdog remembers of one connection between ticks.
struct Watched {
    activity: Weak<Activity>,
    /// The activity counter at the last tick.
    seen: u64,
    /// The tick that last saw activity.
    idle_since: Instant,
    /// The head being read when a tick first saw it, and that tick.
    head: Option<(u64, Instant)>,
    /// A graceful close was ordered.
    closing: bool,
    /// When to force that close (none while draining: the drain deadline does).
    force_at: Option<Instant>,
}

/// The tick of the watchdog for these limits.
pub fn tick(limits: &Limits) -> Duration {
    (limits.head_read_timeout.min(limits.idle_timeout) / 4).max(Duration::from_millis(10))
}

/// Runs the watchdog of the current worker until the worker's runtime ends.
pub async fn run(limits: Limits, mut shutdown: watch::Receiver<bool>) {
    let mut watched: Vec<Watched> = Vec::new();
    let tick = tick(&limits);
    let mut draining = *shutdown.borrow();
    let mut next = tokio::time::Instant::now();
    loop {
        // On the worker's timer board (`timer`): no timer in the runtime's wheel.
        tokio::select! {
            () = crate::timer::sleep_until(next) => {}
            _ = shutdown.changed(), if !draining => draining = true,
        }
        let now = Instant::now();
        next = tokio::time::Instant::from_std(now) + tick;
        NEW.with_borrow_mut(|new| {
            watched.extend(new.drain(..).map(|activity| Watched {
                activity,
                seen: 0,
                idle_since: now,
                head: None,
                closing: false,
                force_at: None,
            }))
        });
        watched.retain_mut(|w| {
            let Some(a) = w.activity.upgrade() else {
                return false;
            };
            check(w, &a, &limits, now, draining);
            true
        });
    }
}

fn check(w: &mut Watched, a: &Activity, limits: &Limits, now: Instant, draining: bool) {
    if w.closing {
        if w.force_at.is_some_and(|at| now >= at) {
            a.order(Order::Cut);
        }
        return;
    }
    let events = a.events();
    if events != w.seen {
        w.seen = events;
        w.idle_since = now;
    }
    match (a.head_pending(), w.head) {
        (Some(n), Some((seen, since))) if n == seen => {
            if now >= since + limits.head_read_timeout {
                tracing::debug!("request head not received in time; closing");
                a.order(Order::Cut);
                return;
            }
        }
        (Some(n), _) => w.head = Some((n, now)),
        (None, _) => w.head = None,
    }
    let idle = !a.busy() && now >= w.idle_since + limits.idle_timeout;
    if draining || idle {
        a.order(Order::Close);
        w.closing = true;
        w.force_at = (!draining).then(|| now + FORCE_CLOSE_AFTER);
    }
}
