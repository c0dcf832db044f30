//! A request's integration deadline, on a timer the worker re-arms rather than re-makes.
//!
//! `tokio::time::timeout_at` makes a timer per call: on its first wait it is put into the
//! runtime's timer wheel (under the wheel's lock) and on drop taken out again (the lock
//! once more), about 600 instructions per forwarded request. A [`Deadline`] instead takes
//! a timer from its worker's stock and gives it back when the request is done. A timer in
//! the stock stays in the wheel at the deadline it last had. A request whose deadline is
//! later (each one's is when the timeouts are alike) keeps it so: the timer fires early,
//! once per timeout period, and the wait that holds it then moves it to its own deadline
//! and waits on. A timer left in the stock past its deadline fires once, waking the task
//! that last waited on it for nothing (a spurious wake is harmless: futures re-check their
//! state).
//!
//! The stock is per worker thread (one `current_thread` runtime each: the timers belong to
//! that runtime), filled only between [`enable`] and [`disable`], which the worker calls
//! around its runtime's life. Elsewhere (tests, the control thread) every `Deadline` makes
//! its own timer and drops it.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// Timers a worker keeps at most (about its requests in flight at a peak; beyond, the
/// timers of finished requests are dropped).
const STOCK: usize = 4096;

type Timer = Pin<Box<Sleep>>;

thread_local! {
    /// The worker's idle timers, most recently used last; `None` outside a worker.
    static IDLE: RefCell<Option<Vec<Timer>>> = const { RefCell::new(None) };
}

/// Starts keeping timers on this thread (a worker, inside its runtime).
pub fn enable() {
    IDLE.with_borrow_mut(|s| *s = Some(Vec::new()));
}

/// Drops this thread's timers and stops keeping them; the worker calls it before its
/// runtime ends (a timer must not outlive its runtime's driver).
pub fn disable() {
    let stock = IDLE.with_borrow_mut(Option::take);
    drop(stock);
}

/// A point in time after which a wait gives up. The timer is taken on the first wait
/// that does not finish at once, and given back on drop.
pub struct Deadline {
    at: Instant,
    timer: Option<Timer>,
}

/// The deadline passed first.
#[derive(Debug, PartialEq, Eq)]
pub struct Elapsed;

impl Deadline {
    pub fn new(at: Instant) -> Self {
        Self { at, timer: None }
    }

    pub fn at(&self) -> Instant {
        self.at
    }

    /// Waits for `f` until the deadline: its output, or [`Elapsed`] (and `f` dropped).
    pub fn wait<F: Future>(&mut self, f: F) -> Within<'_, F> {
        Within { deadline: self, f }
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let at = self.at;
        let timer = self.timer.get_or_insert_with(|| take(at));
        loop {
            std::task::ready!(timer.as_mut().poll(cx));
            if timer.deadline() >= at {
                return Poll::Ready(());
            }
            // A kept timer fired at the earlier deadline it came with (see `take`): now
            // it is moved to this one.
            timer.as_mut().reset(at);
        }
    }
}

/// A timer for `at`: one of the worker's, or a new one.
///
/// A kept timer still armed for a moment before `at` is left as it is: it fires early,
/// once, and [`Deadline::poll_timer`] moves it to `at` then. Under a steady load every
/// request's deadline is later than the one its timer last served, so a timer is moved
/// about once per timeout period instead of once per request (a move costs ~120
/// instructions). One that fired already, or is due after `at` (a stage with a shorter
/// timeout), is moved now.
fn take(at: Instant) -> Timer {
    match IDLE.with_borrow_mut(|s| s.as_mut().and_then(Vec::pop)) {
        Some(mut t) => {
            if t.is_elapsed() || t.deadline() > at {
                t.as_mut().reset(at);
            }
            t
        }
        None => Box::pin(tokio::time::sleep_until(at)),
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let Some(t) = self.timer.take() {
            IDLE.with_borrow_mut(|s| {
                if let Some(s) = s.as_mut().filter(|s| s.len() < STOCK) {
                    s.push(t);
                }
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// [`Deadline::wait`]'s future: the wait and a borrow of the deadline (a plain async
    /// function would store the wait twice, as argument and as local, and this future is
    /// part of every forwarded request's).
    pub struct Within<'a, F> {
        deadline: &'a mut Deadline,
        #[pin]
        f: F,
    }
}

impl<F: Future> Future for Within<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.f.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        this.deadline.poll_timer(cx).map(|()| Err(Elapsed))
    }
}

#[cfg(test)]
fn stocked() -> usize {
    IDLE.with_borrow(|s| s.as_ref().map_or(0, Vec::len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn after(ms: u64) -> Deadline {
        Deadline::new(Instant::now() + Duration::from_millis(ms))
    }

    /// Pending once (so that the wait takes a timer), then ready.
    async fn one_wait() -> u8 {
        tokio::task::yield_now().await;
        7
    }

    /// Leaves one timer in the stock, armed for `ms` from now (a wait that took it and
    /// finished first).
    async fn stock_a_timer_due_in(ms: u64) {
        let mut d = after(ms);
        d.wait(one_wait()).await.unwrap();
        drop(d);
        assert_eq!(stocked(), 1);
    }

    #[tokio::test]
    async fn a_wait_that_finishes_first_gives_its_output() {
        assert_eq!(after(60_000).wait(async { 5 }).await, Ok(5));
        assert_eq!(after(60_000).wait(one_wait()).await, Ok(7));
    }

    #[tokio::test]
    async fn a_wait_past_the_deadline_gives_up() {
        let r: Result<(), Elapsed> = after(20).wait(std::future::pending()).await;
        assert_eq!(r, Err(Elapsed));
    }

    #[tokio::test]
    async fn timers_are_kept_only_on_workers() {
        after(60_000).wait(one_wait()).await.unwrap();
        assert_eq!(stocked(), 0, "no stock before enable");
        enable();
        let mut d = after(60_000);
        d.wait(one_wait()).await.unwrap();
        drop(d);
        assert_eq!(stocked(), 1, "the timer went back to the stock");
        // A wait that finishes at once takes no timer.
        after(60_000).wait(async {}).await.unwrap();
        assert_eq!(stocked(), 1);
        disable();
        assert_eq!(stocked(), 0);
    }

    #[tokio::test]
    async fn a_kept_timer_moved_earlier_fires_at_the_new_deadline() {
        enable();
        stock_a_timer_due_in(60_000).await;
        // The same timer, now due in 20 ms: it must fire long before a 10 s sleep ends
        // (not at its old deadline a minute away).
        let mut near = after(20);
        tokio::select! {
            r = near.wait(std::future::pending::<()>()) => assert_eq!(r, Err(Elapsed)),
            () = tokio::time::sleep(Duration::from_secs(10)) => panic!("the reused timer kept its old deadline"),
        }
        assert_eq!(stocked(), 0, "the timer was taken from the stock");
        drop(near);
        disable();
    }

    #[tokio::test]
    async fn a_kept_timer_that_fired_serves_again() {
        enable();
        let mut first = after(10);
        let r: Result<(), Elapsed> = first.wait(std::future::pending()).await;
        assert_eq!(r, Err(Elapsed));
        drop(first);
        assert_eq!(stocked(), 1, "a fired timer goes back too");
        // Re-armed from its fired state: it neither fires at once nor fails to fire.
        let mut next = after(10_000);
        let r = next
            .wait(tokio::time::sleep(Duration::from_millis(50)))
            .await;
        assert_eq!(r, Ok(()));
        drop(next);
        let mut last = after(10);
        let r: Result<(), Elapsed> = last.wait(std::future::pending()).await;
        assert_eq!(r, Err(Elapsed));
        drop(last);
        disable();
    }

    #[tokio::test]
    async fn a_kept_timer_due_earlier_gives_up_at_the_new_deadline_not_before() {
        enable();
        stock_a_timer_due_in(20).await;
        // The kept timer is still due at the old 20 ms when the next wait takes it: it
        // fires then, and the wait must neither give up nor hang, but end at its own.
        let start = Instant::now();
        let mut later = after(150);
        let r: Result<(), Elapsed> = later.wait(std::future::pending()).await;
        assert_eq!(r, Err(Elapsed));
        assert!(
            start.elapsed() >= Duration::from_millis(140),
            "gave up after {:?}, at the kept timer's old deadline",
            start.elapsed()
        );
        drop(later);
        assert_eq!(stocked(), 1);
        disable();
    }

    #[tokio::test]
    async fn a_kept_timer_moved_later_does_not_fire_at_its_old_deadline() {
        enable();
        stock_a_timer_due_in(30).await;
        // Moved to 10 s from now; the answer comes after 300 ms, well past the old 30 ms.
        let mut later = after(10_000);
        let r = later
            .wait(tokio::time::sleep(Duration::from_millis(300)))
            .await;
        assert_eq!(r, Ok(()));
        drop(later);
        assert_eq!(stocked(), 1);
        disable();
    }
}
