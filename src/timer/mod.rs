//! Deadlines for the request path without a timer in the runtime per request.
//!
//! A worker's runtime reads the clock before it parks whenever a timer is armed in its
//! timer wheel, and a timer per request (`tokio::time::timeout_at`) is filed into the
//! wheel and taken out again. With the watchdog's and the pool sweeper's intervals and the
//! integration deadline that was about 600 instructions per forwarded request; the board
//! below costs about 190 of them back (callgrind, one keep-alive connection). On a worker, a [`Deadline`] is instead a slot on the worker's board
//! (`board.rs`), and one process-wide timer thread (`ticker.rs`) sleeps until the earliest
//! moment any board asked for and wakes that worker's scanner task, which fires what is
//! due. The worker's runtime then has no timer armed while its requests end in time, and
//! parks as if it had no timers at all.
//!
//! Precision: a deadline fires when the timer thread wakes (the kernel's timer slack,
//! ~50 µs) plus the time the worker takes to run its scanner (behind the tasks already
//! queued). The timer thread wakes when a board's earliest deadline comes, about once per
//! timeout period under a steady load, and for the watchdog's and sweeper's ticks.
//!
//! Elsewhere (tests, the control thread) a `Deadline` is a tokio timer of its own.
//! Short-lived waits that happen per connection, not per request (connecting to a backend,
//! a TLS handshake, a lingering close) keep using tokio's timers.

mod board;
mod ticker;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// Starts this thread's board (a worker, inside its runtime).
pub fn enable() {
    board::enable();
}

/// Drops this thread's board; the worker calls it before its runtime ends.
pub fn disable() {
    board::disable();
}

/// A point in time after which a wait gives up. It is armed by the first wait that does
/// not finish at once, and disarmed on drop.
pub struct Deadline {
    /// Nanoseconds since the timer epoch, as the board keeps deadlines (worked out once).
    /// Not an `Instant`: with `timer`, the whole stays at 24 bytes, its size before the
    /// board. It is part of every backend call's future, whose size decides that future's
    /// `malloc` path (see `pipeline::handle`).
    at: u64,
    timer: Timer,
}

// The size the backend call's future was measured with (see `Deadline::at`, the field).
const _: () = assert!(std::mem::size_of::<Deadline>() <= 24);

enum Timer {
    Unarmed,
    /// On this worker's board.
    Board(board::Armed),
    /// Off a worker: a timer of its own.
    Tokio(Pin<Box<Sleep>>),
}

/// The deadline passed first.
#[derive(Debug, PartialEq, Eq)]
pub struct Elapsed;

impl Deadline {
    pub fn new(at: Instant) -> Self {
        Self {
            at: ticker::nanos(at.into_std()),
            timer: Timer::Unarmed,
        }
    }

    pub fn at(&self) -> Instant {
        Instant::from_std(ticker::instant(self.at))
    }

    /// Waits for `f` until the deadline: its output, or [`Elapsed`] (and `f` dropped).
    pub fn wait<F: Future>(&mut self, f: F) -> Within<'_, F> {
        Within { deadline: self, f }
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.timer {
            Timer::Board(a) => board::poll(*a, cx),
            Timer::Tokio(t) => t.as_mut().poll(cx),
            Timer::Unarmed => match board::arm(self.at, cx) {
                Some(a) => {
                    self.timer = Timer::Board(a);
                    Poll::Pending
                }
                None => {
                    let mut t = Box::pin(tokio::time::sleep_until(self.at()));
                    let p = t.as_mut().poll(cx);
                    self.timer = Timer::Tokio(t);
                    p
                }
            },
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let Timer::Board(a) = self.timer {
            board::disarm(a);
        }
    }
}

/// Waits until `at` (on a worker, on its board).
pub async fn sleep_until(at: Instant) {
    let mut d = Deadline::new(at);
    let _ = d.wait(std::future::pending::<()>()).await;
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
mod tests {
    use super::*;
    use std::time::Duration;

    fn after(ms: u64) -> Deadline {
        Deadline::new(Instant::now() + Duration::from_millis(ms))
    }

    /// Pending once (so that the wait arms its deadline), then ready.
    async fn one_wait() -> u8 {
        tokio::task::yield_now().await;
        7
    }

    /// Arms `d` (a wait polled once, then given up) and leaves it armed.
    async fn arm(d: &mut Deadline) {
        tokio::select! {
            biased;
            _ = d.wait(std::future::pending::<()>()) => panic!("fired at once"),
            () = tokio::task::yield_now() => {}
        }
    }

    /// Waits on `d` for nothing; fails if it has not given up within 10 s. How long it took.
    async fn gives_up(d: &mut Deadline) -> Duration {
        let start = Instant::now();
        tokio::select! {
            r = d.wait(std::future::pending::<()>()) => assert_eq!(r, Err(Elapsed)),
            () = tokio::time::sleep(Duration::from_secs(10)) => panic!("the deadline never fired"),
        }
        start.elapsed()
    }

    #[tokio::test]
    async fn a_wait_that_finishes_first_gives_its_output() {
        assert_eq!(after(60_000).wait(async { 5 }).await, Ok(5));
        assert_eq!(after(60_000).wait(one_wait()).await, Ok(7));
        enable();
        assert_eq!(after(60_000).wait(one_wait()).await, Ok(7));
        assert_eq!(board::armed(), 0, "the deadline was disarmed with its wait");
        disable();
    }

    #[tokio::test]
    async fn a_wait_past_the_deadline_gives_up_off_a_worker() {
        assert!(gives_up(&mut after(20)).await >= Duration::from_millis(20));
    }

    #[tokio::test]
    async fn a_deadline_on_a_board_gives_up_at_its_time_not_before() {
        enable();
        let mut d = after(80);
        assert!(gives_up(&mut d).await >= Duration::from_millis(80));
        drop(d);
        // The board serves again once the timer thread has slept through an empty spell.
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(gives_up(&mut after(40)).await >= Duration::from_millis(40));
        assert_eq!(board::armed(), 0);
        disable();
    }

    #[tokio::test]
    async fn an_earlier_deadline_armed_after_a_later_one_fires_at_its_own() {
        enable();
        let mut far = after(60_000);
        arm(&mut far).await;
        assert_eq!(board::armed(), 1);
        // The board asked for a look in a minute; the nearer deadline must move that up.
        assert!(gives_up(&mut after(30)).await >= Duration::from_millis(30));
        drop(far);
        assert_eq!(board::armed(), 0);
        disable();
    }

    #[tokio::test]
    async fn a_look_at_a_deadline_that_ended_moves_on_to_the_next() {
        enable();
        // The board asks for a look at 30 ms for `near`, which then ends: the look at 30 ms
        // finds nothing due and must ask for the next one, `later`'s.
        let mut near = after(30);
        arm(&mut near).await;
        let mut later = after(150);
        arm(&mut later).await;
        drop(near);
        let took = gives_up(&mut later).await;
        assert!(took >= Duration::from_millis(100), "gave up after {took:?}");
        disable();
    }

    #[tokio::test]
    async fn a_deadline_of_an_earlier_board_leaves_the_new_one_alone() {
        enable();
        let mut old = after(60_000);
        arm(&mut old).await;
        disable();
        enable();
        let mut new = after(50);
        arm(&mut new).await;
        drop(old);
        assert_eq!(
            board::armed(),
            1,
            "the old deadline freed the new one's slot"
        );
        assert!(gives_up(&mut new).await >= Duration::from_millis(40));
        disable();
    }

    #[test]
    fn each_workers_deadlines_fire_on_that_worker() {
        let workers: Vec<_> = (0..3)
            .map(|i| {
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    rt.block_on(async move {
                        enable();
                        let took = gives_up(&mut after(40 + 20 * i)).await;
                        disable();
                        took
                    })
                })
            })
            .collect();
        for (i, w) in workers.into_iter().enumerate() {
            let took = w.join().unwrap();
            assert!(
                took >= Duration::from_millis(40 + 20 * i as u64),
                "{took:?}"
            );
        }
    }

    #[tokio::test]
    async fn sleep_until_sleeps_on_a_worker_and_off() {
        let start = Instant::now();
        sleep_until(start + Duration::from_millis(30)).await;
        assert!(start.elapsed() >= Duration::from_millis(30));
        enable();
        let start = Instant::now();
        sleep_until(start + Duration::from_millis(30)).await;
        assert!(start.elapsed() >= Duration::from_millis(30));
        disable();
    }
}
