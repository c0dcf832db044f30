//! Fleet-mode quota store: counters in Redis, shared by every instance of a fleet, so that a
//! usage plan's limit holds for the fleet and not per instance.
//!
//! An admission is a step of a Lua script (EVALSHA) that checks the window's counter and
//! increments it only when under the limit, atomically. Admitted requests are counted in
//! the key's usage hour by the worker and added to Redis once a second (see
//! [`super::fleet_usage`]). The admissions a worker has at one time go together, in one
//! call of the script, which takes them counter by counter (see [`Batches`], [`ADMIT`]):
//! each one is still exact, a busy worker makes one round trip for many requests instead
//! of one each, and a hot key's admissions in one call cost Redis one command, not one
//! each. Keys are named from stable ids (usage plan, key, window start) and expire an hour
//! after their window ends; usage hours expire after the retention period. Both kinds of
//! key carry the plan as their hash tag (`scpgw:quota:{plan}:key:window`,
//! `scpgw:usage:{plan}:hour`): in a Redis Cluster a plan's keys live in one slot, so a
//! call of either script is one atomic step on one master, and different plans spread
//! over the masters. Redis failures and timeouts surface as [`QuotaError::Unavailable`];
//! the pipeline applies `quota.failure_mode` and counts `apigw_quota_store_errors_total`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;

use super::fleet_usage::{Tally, UsageName, PUSH};
use super::{AdmitFuture, CounterSlot, QuotaError, QuotaStore, UsageRow, Window};
use crate::fleet::{key_part, Fleet, FleetError, PREFIX};

/// The admissions of one call, key by key, each key's as if they were calls of their own,
/// one after the other. KEYS: each group's window counter in turn; ARGV: each group's
/// limit, counter expiry (Unix s) and number of admissions `n` in turn. A group is the
/// admissions of one call for one counter and usage hour (same key, window, limit and
/// hour: see [`Group`]).
/// Returns one integer per group, comma-separated in one string: the counter just after
/// adding the group's `n` (the reply is parsed on the worker, and the client parses a
/// string several times faster than an array).
///
/// A group adds its `n` to the counter first and takes back as many as went over the
/// limit: the script is one atomic step, so no reader ever sees the count above the limit.
/// The first `limit − (count − n)` admissions of the group, in arrival order, are admitted,
/// the rest refused and not counted: exactly what `n` admissions one at a time would give,
/// and the worker works out each one's count from the group's ([`GroupReply`]) and counts
/// the admitted ones in their usage hour ([`super::fleet_usage`]). Under load most
/// admissions of a call are a few hot keys': one `INCRBY` serves a group (Redis's time per
/// call of 10 admissions of one key, `INFO commandstats` under `redis-benchmark`: 19 µs one
/// step each, 2.8 µs as a group when the script counted usage too, 1.9–2.1 µs now; 10
/// admissions of 10 keys: 24–27 µs with usage, 13–14 µs now). The numbers go back to
/// Redis as the strings they came as where they can: a Lua number given to `redis.call` is
/// formatted with `%.17g`, which cost about a fifth of the call. A refusal costs a
/// `DECRBY`; an instance asks again for a key refused in this window only after a snapshot
/// reload (see [`FleetKeys::exhausted`]), so a client hammering an exhausted key does not
/// reach Redis.
///
/// A counter's expiry is set when the script makes it (its first increment): the key never
/// exists without it, as both happen in this one atomic step, and an `EXPIREAT` fewer on
/// every other admission took about a fifth off Redis's time per admission (measured with
/// `redis-benchmark` and `INFO commandstats`: 5.4–6.9 µs → 3.7–5.0 µs per call).
const ADMIT: &str = r"
local out = {}
local a = 0
for i = 1, #KEYS do
  local count = redis.call('INCRBY', KEYS[i], ARGV[a + 3])
  local n = tonumber(ARGV[a + 3])
  if count == n then
    redis.call('EXPIREAT', KEYS[i], ARGV[a + 2])
  end
  local over = count - tonumber(ARGV[a + 1])
  if over > 0 then
    if over > n then
      over = n
    end
    redis.call('DECRBY', KEYS[i], over)
  end
  out[#out + 1] = count
  a = a + 3
end
return table.concat(out, ',')
";

/// Admissions one call carries at most (more go in more calls).
const BATCH_MAX: usize = 256;

/// The count and the decision of one admission, from its reply as [`GroupReply::nth`]
/// gives it: the count after it if admitted (≥ 1), its negation if refused (≤ 0).
fn admission(reply: i64) -> (u64, bool) {
    (reply.unsigned_abs(), reply > 0)
}

/// What [`ADMIT`] did for a group of admissions of one counter: the count before them and
/// how many of them it admitted (the first ones, in arrival order).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct GroupReply {
    before: i64,
    admitted: i64,
}

impl GroupReply {
    /// From `count`, the counter just after the script added the group's `n` admissions,
    /// and the group's `limit`, as the script decides (see [`ADMIT`]).
    fn new(count: i64, n: usize, limit: u64) -> Result<Self, QuotaError> {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        match count.checked_sub(n) {
            Some(before) if before >= 0 => {
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                Ok(Self {
                    before,
                    admitted: limit.saturating_sub(before).clamp(0, n),
                })
            }
            _ => Err(QuotaError::Unavailable(format!(
                "the fleet's Redis answered a count of {count} for {n} admissions"
            ))),
        }
    }

    /// The reply of the group's `j`-th admission (from 0): the count after it if admitted,
    /// the count's negation if refused (the count stays where the admitted ones left it).
    fn nth(&self, j: usize) -> i64 {
        let j = i64::try_from(j).unwrap_or(i64::MAX);
        if j < self.admitted {
            self.before + j + 1
        } else {
            -(self.before + self.admitted)
        }
    }
}

/// How long after its window's end a counter is kept (clock skew between instances).
const COUNTER_GRACE_SECS: i64 = 3600;

pub struct RedisQuotaStore {
    retention_secs: i64,
    batches: Arc<Batches>,
    /// [`PUSH`], which adds the workers' usage tallies to the usage hours.
    push: redis::Script,
}

impl RedisQuotaStore {
    pub fn new(fleet: Arc<Fleet>, retention_secs: i64) -> Arc<Self> {
        Arc::new(Self {
            retention_secs,
            batches: Arc::new(Batches {
                queues: (0..crate::worker::shards())
                    .map(|_| Mutex::new(Queue::default()))
                    .collect(),
                admit: redis::Script::new(ADMIT),
                fleet,
            }),
            push: redis::Script::new(PUSH),
        })
    }

    fn fleet(&self) -> &Fleet {
        &self.batches.fleet
    }

    /// Adds the requests every worker admitted since the last push to their usage hours:
    /// one call of [`PUSH`] (one per slot in a Redis Cluster, and per 500 counts: see
    /// `Tally::into_calls`), concurrently. What a call could not add is given back and sent
    /// with the next push.
    async fn push_usage(&self) -> Result<(), QuotaError> {
        let counts = self.batches.take_usage();
        if counts.is_empty() {
            return Ok(());
        }
        let calls = counts.into_calls(!self.fleet().is_standalone());
        let sha = self.push.get_hash();
        let results = futures_util::future::join_all(calls.into_iter().map(|t| async move {
            let cmd = t.command(sha, self.retention_secs);
            let r =
                self.fleet()
                    .call(move |mut conn| async move {
                        query_loading::<i64>(&cmd, PUSH, &mut conn).await
                    })
                    .await;
            (t, r)
        }))
        .await;
        let mut failed = None;
        for (t, r) in results {
            if let Err(e) = r {
                self.batches.untake_usage(t);
                failed.get_or_insert(unavailable(e));
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// `cmd`, an EVALSHA of `script`; a Redis that has not seen the script (restarted,
/// flushed, a new master) is given it and asked again, as `Script::invoke_async` does.
async fn query_loading<T: redis::FromRedisValue>(
    cmd: &redis::Cmd,
    script: &str,
    conn: &mut crate::fleet::FleetConn,
) -> redis::RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(script)
                .exec_async(conn)
                .await?;
            cmd.query_async(conn).await
        }
        r => r,
    }
}

/// An admission's ARGV (see [`ADMIT`]).
#[derive(Clone, Copy)]
struct Argv {
    limit: u64,
    /// Unix seconds.
    counter_expiry: i64,
}

/// Where an admission's answer goes.
type Answer = tokio::sync::oneshot::Sender<Result<i64, QuotaError>>;

/// The admissions one call will carry: their keys and arguments already written as the
/// call's KEYS and ARGV (see [`ADMIT`]; no string of their own), and where each one's
/// answer goes, in the same order. Used again once its call is answered (see
/// [`Queue::spare`]).
struct Pending {
    /// The slot of every key here (in a Redis Cluster; 0 for a standalone Redis).
    slot: u16,
    /// Each group's keys, in turn.
    keys: Args,
    /// Each group's arguments but its number of admissions (written as the call is made).
    argv: Args,
    /// Each group's usage name, its two strings in turn (see [`UsageName`]): copied into
    /// the worker's usage tally when the key is new there. Copies, not a reference to the
    /// compiled key, which a reload may drop while the call is out.
    names: Args,
    groups: Vec<Group>,
    /// Each admission's group (an index in `groups`) and where its answer goes, in
    /// arrival order.
    answers: Vec<(usize, Answer)>,
}

/// The admissions of one call for one counter: same key (its names in the call), same
/// window, same limit and same usage hour. [`ADMIT`] takes them in one step.
struct Group {
    /// Where the group's counter key starts in its call's `keys`, and how long its prefix
    /// (the plan and the key) is: the name is the prefix and the window's start.
    counter_at: usize,
    prefix_len: usize,
    window: Window,
    limit: u64,
    /// The key's usage name ([`UsageName::id`]; its strings are in the call's `names`) and
    /// the usage hour its admitted requests are counted in once the call is answered.
    usage_id: u64,
    hour: i64,
    /// Admissions in the group.
    n: usize,
    /// What Redis did for the group, once the call is answered, and how many of its
    /// admissions have been given their answer.
    reply: GroupReply,
    answered: usize,
}

/// Groups of a call an admission is compared with, most recent first, before it starts a
/// group of its own: under load a few hot keys make most admissions, and the comparison
/// (three numbers, a key prefix) must stay cheap in a call of many keys.
const GROUPS_LOOKED_AT: usize = 8;

/// Arguments written for a call still to be made: their bytes end to end, and where each
/// one ends. What a `redis::Cmd` keeps, but one that can be emptied and written again (a
/// `Cmd` cannot), so that a worker's calls reuse their buffers.
#[derive(Default)]
struct Args {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl Args {
    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.ends.iter().scan(0, |start, &end| {
            let arg = &self.data[*start..end];
            *start = end;
            Some(arg)
        })
    }

    fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
    }

    fn reserve(&mut self, args: usize, bytes: usize) {
        self.data.reserve(bytes);
        self.ends.reserve(args);
    }
}

impl redis::RedisWrite for Args {
    fn write_arg(&mut self, arg: &[u8]) {
        self.data.extend_from_slice(arg);
        self.ends.push(self.data.len());
    }
}

/// Admissions of one worker waiting for their call to Redis.
#[derive(Default)]
struct Queue {
    /// A task is on its way to send what waits here.
    flush: bool,
    /// Calls of this worker's admissions under way (sent and not yet answered).
    in_flight: usize,
    /// The last call sent from this queue carried more than one admission: the worker is
    /// busy, and its admissions go together (none alone) until a call carries just one.
    busy: bool,
    /// Admissions the largest call of the last flush carried: a new call makes room for as
    /// many at once (growing its buffers admission by admission reallocated each several
    /// times per call: ~580 instructions per admission in the load bench's 16-connection
    /// count).
    size_hint: usize,
    pending: Vec<Pending>,
    /// This worker's admitted requests not yet added to their usage hours in Redis
    /// ([`RedisQuotaStore::push`]).
    usage: Tally,
    /// Calls answered, emptied, their buffers kept for the next ones (at most
    /// [`SPARE_MAX`]): a call's buffers are several KiB under load, which glibc's
    /// allocator serves on its slow path (~400 instructions per request in the load
    /// bench's 16-connection count, allocation and release).
    spare: Vec<Pending>,
}

/// Emptied calls a queue keeps (about as many as it has calls under way at once).
const SPARE_MAX: usize = 4;

impl Pending {
    /// A call for the keys of `slot`, with room for `n` admissions.
    fn new(slot: u16, n: usize) -> Self {
        let empty = Self {
            slot,
            keys: Args::default(),
            argv: Args::default(),
            names: Args::default(),
            groups: Vec::new(),
            answers: Vec::new(),
        };
        empty.reuse(slot, n)
    }

    /// An answered call, emptied, for the keys of `slot` with room for `n` admissions (its
    /// buffers kept, grown if need be).
    fn reuse(mut self, slot: u16, n: usize) -> Self {
        let n = n.clamp(1, BATCH_MAX);
        self.slot = slot;
        self.keys.clear();
        // A key of about 50 bytes, two arguments of about 12 (see `add`).
        self.keys.reserve(n, 56 * n);
        self.argv.clear();
        self.argv.reserve(2 * n, 24 * n);
        self.names.clear();
        self.names.reserve(2 * n, 48 * n);
        self.groups.clear();
        self.groups.reserve(n);
        self.answers.clear();
        self.answers.reserve(n);
        self
    }

    /// Counts each group's admitted requests in their usage hours (the call is answered).
    fn count_usage(&self, usage: &mut Tally) {
        let mut names = self.names.iter();
        for g in &self.groups {
            let (prefix, key_id) = (names.next(), names.next());
            let Ok(admitted @ 1..) = u64::try_from(g.reply.admitted) else {
                continue;
            };
            usage.add(g.usage_id, g.hour, admitted, || UsageName {
                id: g.usage_id,
                prefix: String::from_utf8_lossy(prefix.unwrap_or_default()).into(),
                key_id: String::from_utf8_lossy(key_id.unwrap_or_default()).into(),
                // The call's slot is its keys' (and their usage hours'); 0 for a
                // standalone Redis, which takes every push in one call.
                slot: self.slot,
            });
        }
    }

    /// Adds one admission to the call, answered on `answer`: to the group of its counter if
    /// one of the last few has it, else as a group of its own, its keys and arguments
    /// written into the call.
    fn add(&mut self, keys: &FleetKeys, (window, hour): (Window, i64), argv: Argv, answer: Answer) {
        use redis::{RedisWrite, ToRedisArgs};
        let prefix = keys.counter.as_bytes();
        let found = self
            .groups
            .iter()
            .enumerate()
            .rev()
            .take(GROUPS_LOOKED_AT)
            .find(|(_, g)| {
                g.window == window
                    && g.hour == hour
                    && g.limit == argv.limit
                    && g.prefix_len == prefix.len()
                    && self
                        .keys
                        .data
                        .get(g.counter_at..g.counter_at + g.prefix_len)
                        == Some(prefix)
            })
            .map(|(at, _)| at);
        let at = match found {
            Some(at) => at,
            None => {
                self.groups.push(Group {
                    counter_at: self.keys.data.len(),
                    prefix_len: prefix.len(),
                    window,
                    limit: argv.limit,
                    usage_id: keys.usage.id,
                    hour,
                    n: 0,
                    reply: GroupReply::default(),
                    answered: 0,
                });
                keys.counter_key(window).write_redis_args(&mut self.keys);
                self.names.write_arg(keys.usage.prefix.as_bytes());
                self.names.write_arg(keys.usage.key_id.as_bytes());
                add_argv(&mut self.argv, argv);
                self.groups.len() - 1
            }
        };
        self.groups[at].n += 1;
        self.answers.push((at, answer));
    }
}

/// Writes an admission's arguments into `out`.
fn add_argv(out: &mut impl redis::RedisWrite, argv: Argv) {
    use redis::ToRedisArgs;
    argv.limit.write_redis_args(out);
    argv.counter_expiry.write_redis_args(out);
}

/// A call of queue `i`'s worker under way: counted in the queue's `in_flight` from its
/// start until this is dropped (answered, timed out, or its request gone).
struct InFlight<'a> {
    batches: &'a Batches,
    i: usize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.batches.queue(self.i).in_flight -= 1;
    }
}

/// A queued admission waiting for the answer of the call that carries it.
pub struct Queued<'a> {
    wait: tokio::sync::oneshot::Receiver<Result<i64, QuotaError>>,
    keys: &'a FleetKeys,
    window: Window,
}

impl std::future::Future for Queued<'_> {
    type Output = Result<(u64, bool), QuotaError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let reply = std::task::ready!(std::pin::Pin::new(&mut self.wait).poll(cx));
        std::task::Poll::Ready(match reply {
            Ok(reply) => reply.map(|r| self.keys.answered(self.window, admission(r))),
            Err(_) => Err(QuotaError::Unavailable(
                "the call to the fleet's Redis was given up".into(),
            )),
        })
    }
}

/// Where an admission goes ([`Batches::turn`]).
enum Turn<'a> {
    /// A call of its own, from the admission's future, counted as under way.
    Alone(InFlight<'a>),
    /// The queue: its answer comes on this receiver.
    Queued(tokio::sync::oneshot::Receiver<Result<i64, QuotaError>>),
}

/// Group commit of admissions, per worker.
///
/// An admission waits in its worker's [`Queue`]; the first one of an empty queue starts a
/// task that sends everything waiting then, in one call of [`ADMIT`] (in a Redis Cluster,
/// one call per slot: the keys of one call must share one). That task runs after the tasks
/// already woken on the worker (a worker is one `current_thread` runtime, whose queue is
/// first in, first out), so the admissions of every request the worker handles in that
/// round go together: under load a worker makes one round trip per round instead of one
/// per request, sharing the redis crate's work per call (command, channel, reply,
/// wake-ups: most of the fleet mode's cost per request). Each admission is still checked
/// and counted as if on its own, in arrival order, in one atomic script (the admissions of
/// one counter as one group: see [`ADMIT`]). An admission waits at
/// most `quota.timeout` for its answer, as its own call would: a call is given up
/// `quota.timeout` after its first admission was queued.
///
/// An idle worker does not queue ([`Batches::turn`]): an admission that finds no call of
/// its worker under way, nothing waiting and the worker not busy (its last call from the
/// queue carried one admission) sends its own call from its request's future, without the
/// task, the channel and the copy of its arguments (~4,500 instructions of a lone request,
/// the load bench's single-connection count). The admissions that come while it is out
/// queue as above; a queued call that carries more than one marks the worker busy, and
/// its admissions go together from then on, until a queued call carries just one.
///
/// Shared: the queues are one per worker (indexed by `worker::index`, the last one for
/// threads that are not workers), each behind a mutex that only its worker takes on the
/// request path (the shared one is also taken by control-thread calls and tests).
struct Batches {
    queues: Box<[Mutex<Queue>]>,
    admit: redis::Script,
    fleet: Arc<Fleet>,
}

impl Batches {
    fn queue(&self, i: usize) -> std::sync::MutexGuard<'_, Queue> {
        self.queues[i.min(self.queues.len() - 1)]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Where an admission on worker `i` goes, decided under the queue's one lock: a call of
    /// its own when the worker is idle (no call under way, nothing waiting, and its last
    /// call from the queue carried a lone admission), else the queue, where its key
    /// (`keys`'s counter for `window`) and arguments go into the call that will carry it.
    fn turn(
        self: &Arc<Self>,
        i: usize,
        keys: &FleetKeys,
        window_hour: (Window, i64),
        argv: Argv,
    ) -> Turn<'_> {
        let slot = if self.fleet.is_standalone() {
            0
        } else {
            keys.slot
        };
        let (first, wait) = {
            let mut q = self.queue(i);
            if !q.flush && q.in_flight == 0 && !q.busy && q.pending.is_empty() {
                q.in_flight += 1;
                return Turn::Alone(InFlight { batches: self, i });
            }
            let (answer, wait) = tokio::sync::oneshot::channel();
            let at = q
                .pending
                .iter()
                .rposition(|p| p.slot == slot && p.answers.len() < BATCH_MAX)
                .unwrap_or_else(|| {
                    let room = q.size_hint;
                    let p = match q.spare.pop() {
                        Some(p) => p.reuse(slot, room),
                        None => Pending::new(slot, room),
                    };
                    q.pending.push(p);
                    q.pending.len() - 1
                });
            q.pending[at].add(keys, window_hour, argv, answer);
            (!std::mem::replace(&mut q.flush, true), wait)
        };
        if first {
            self.flush(i);
        }
        Turn::Queued(wait)
    }

    /// Sends what waits in queue `i`, from a task of its own.
    fn flush(self: &Arc<Self>, i: usize) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (it is gone): nothing can be sent; the waiting admissions learn
            // it from their dropped answers.
            let mut q = self.queue(i);
            q.flush = false;
            q.pending.clear();
            return;
        };
        // The first admission of the call has just been queued: the call is given up
        // `quota.timeout` from now, so that none of its admissions waits longer (the
        // admissions have no timer of their own).
        let at = tokio::time::Instant::now() + self.fleet.timeout();
        let this = self.clone();
        runtime.spawn(async move {
            let (mut pending, _calls) = {
                let mut q = this.queue(i);
                q.flush = false;
                q.in_flight += 1;
                q.busy = q.pending.iter().map(|p| p.answers.len()).sum::<usize>() > 1;
                q.size_hint = q.pending.iter().map(|p| p.answers.len()).max().unwrap_or(1);
                (
                    std::mem::take(&mut q.pending),
                    InFlight { batches: &this, i },
                )
            };
            if pending.len() == 1 {
                if let Some(p) = pending.pop() {
                    this.send(i, p, at).await;
                }
            } else {
                futures_util::future::join_all(pending.into_iter().map(|p| this.send(i, p, at)))
                    .await;
            }
        });
    }

    /// A call of [`ADMIT`] for `n` groups, their keys and arguments still to be written.
    fn eval(&self, n: usize) -> redis::Cmd {
        let mut eval = redis::Cmd::with_capacity(3 + 4 * n, 64 + 80 * n);
        eval.arg("EVALSHA").arg(self.admit.get_hash()).arg(n);
        eval
    }

    /// Makes the call `eval` of [`ADMIT`] for `n` groups, given up at `at`: their replies
    /// (each group's count), in order.
    async fn call(
        &self,
        eval: redis::Cmd,
        n: usize,
        at: tokio::time::Instant,
    ) -> Result<Vec<i64>, QuotaError> {
        self.fleet
            .call_until(at, |mut conn| async move {
                query_loading::<String>(&eval, ADMIT, &mut conn).await
            })
            .await
            .map_err(unavailable)
            .and_then(|r| counts(&r, n))
    }

    /// One admission in a call of its own (see [`Batches::turn`]): its key and arguments
    /// are written straight into the call, as a group of one. The counter after it.
    async fn call_one(
        &self,
        keys: &FleetKeys,
        window: Window,
        argv: Argv,
    ) -> Result<i64, QuotaError> {
        use redis::ToRedisArgs;
        let mut eval = self.eval(1);
        keys.counter_key(window).write_redis_args(&mut eval);
        add_argv(&mut eval, argv);
        eval.arg(1);
        let at = tokio::time::Instant::now() + self.fleet.timeout();
        Ok(self.call(eval, 1, at).await?[0])
    }

    /// One call of [`ADMIT`] for the admissions of `p` (from queue `i`), given up at `at`;
    /// each one gets its answer, and `p` goes back to the queue's spares.
    async fn send(&self, i: usize, mut p: Pending, at: tokio::time::Instant) {
        let mut eval = self.eval(p.groups.len());
        for arg in p.keys.iter() {
            eval.arg(arg);
        }
        {
            let mut argv = p.argv.iter();
            for g in &p.groups {
                for arg in argv.by_ref().take(2) {
                    eval.arg(arg);
                }
                eval.arg(g.n);
            }
        }
        let replies = self
            .call(eval, p.groups.len(), at)
            .await
            .and_then(|counts| {
                for (g, count) in p.groups.iter_mut().zip(counts) {
                    g.reply = GroupReply::new(count, g.n, g.limit)?;
                }
                Ok(())
            });
        // Counted in usage before any answer goes: a request's usage is in the tally by
        // the time its response is.
        if replies.is_ok() {
            p.count_usage(&mut self.queue(i).usage);
        }
        match replies {
            Ok(()) => {
                for (g, answer) in p.answers.drain(..) {
                    let g = &mut p.groups[g];
                    let _ = answer.send(Ok(g.reply.nth(g.answered)));
                    g.answered += 1;
                }
            }
            Err(e) => {
                for (_, answer) in p.answers.drain(..) {
                    let _ = answer.send(Err(e.clone()));
                }
            }
        }
        let mut q = self.queue(i);
        if q.spare.len() < SPARE_MAX {
            q.spare.push(p);
        }
    }

    /// Counts one admitted request of `name` in the usage hour `hour`, in queue `i`'s tally.
    fn count_usage(&self, i: usize, name: &UsageName, hour: i64) {
        self.queue(i).usage.add(name.id, hour, 1, || name.clone());
    }

    /// Every worker's usage tally, emptied.
    fn take_usage(&self) -> Tally {
        let mut all = Tally::default();
        for i in 0..self.queues.len() {
            let mine = std::mem::take(&mut self.queue(i).usage);
            all.merge(mine);
        }
        all
    }

    /// Gives back counts a push could not add (the shared queue's tally takes them).
    fn untake_usage(&self, counts: Tally) {
        self.queue(usize::MAX).usage.merge(counts);
    }
}

/// The `n` comma-separated integers of an [`ADMIT`] reply.
///
/// Split by a set of one char rather than by the char: for a reply of short numbers the
/// char's searcher (`memchr` per piece) costs more than looking at each char (callgrind,
/// 7 numbers: ~2,000 instructions per reply with `collect` → ~1,250).
fn counts(reply: &str, n: usize) -> Result<Vec<i64>, QuotaError> {
    let mut counts = Vec::with_capacity(n);
    for count in reply.split([',']) {
        counts.push(count.parse().map_err(|_| {
            QuotaError::Unavailable(
                "the fleet's Redis answered an admission that is not a number".into(),
            )
        })?);
    }
    if counts.len() == n {
        Ok(counts)
    } else {
        Err(QuotaError::Unavailable(format!(
            "the fleet's Redis answered {} admissions for {n}",
            counts.len()
        )))
    }
}

/// A key name: a prefix and a number in decimal, written into the command as one argument
/// without a `String` of its own.
struct Numbered<'a>(&'a str, i64);

impl redis::ToRedisArgs for Numbered<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        const ON_STACK: usize = 192;
        let mut n = itoa::Buffer::new();
        let n = n.format(self.1).as_bytes();
        let len = self.0.len() + n.len();
        if len > ON_STACK {
            return out.write_arg(with_number(self.0, self.1).as_bytes());
        }
        let mut buf = [0u8; ON_STACK];
        buf[..self.0.len()].copy_from_slice(self.0.as_bytes());
        buf[self.0.len()..len].copy_from_slice(n);
        out.write_arg(&buf[..len]);
    }
}

/// The fixed parts of one (plan, key)'s key names, kept in the compiled key's
/// [`CounterSlot`]: the ids are encoded once, not on every admission.
pub struct FleetKeys {
    /// `scpgw:quota:{plan}:key:`
    counter: Box<str>,
    /// Where the key's usage hours are (`scpgw:usage:{plan}:`, the key id).
    usage: UsageName,
    /// The Redis Cluster slot of both (their hash tag is the plan's).
    slot: u16,
    /// The start of the window in which Redis refused this key (`i64::MIN`: none): its
    /// count reached the limit, and a count never goes down within its window, so every
    /// later admission of the window is refused here without asking Redis. Kept in the
    /// compiled key, whose plan's limit cannot change: a reload that raises the limit
    /// compiles a new key, which asks Redis again. (A Redis that lost the counter within
    /// the window, flushed or restarted without persistence, is not asked again for this
    /// key until the window ends: the count stays within the limit either way.)
    exhausted: AtomicI64,
}

impl FleetKeys {
    fn new(plan_id: &str, key_id: &str) -> Self {
        let (plan, key) = (key_part(plan_id), key_part(key_id));
        let counter = [PREFIX, ":quota:{", &plan, "}:", &key, ":"].concat();
        let slot = redis::cluster_routing::get_slot(counter.as_bytes());
        Self {
            slot,
            counter: counter.into(),
            usage: UsageName::new(usage_prefix(plan_id), key_id, slot),
            exhausted: AtomicI64::new(i64::MIN),
        }
    }

    /// `scpgw:quota:{plan}:key:window-start`.
    fn counter_key(&self, window: Window) -> Numbered<'_> {
        Numbered(&self.counter, window.start)
    }

    /// `scpgw:usage:{plan}:hour-start`.
    #[cfg(test)]
    fn usage_key(&self, hour: i64) -> Numbered<'_> {
        Numbered(&self.usage.prefix, hour)
    }

    /// Redis refused this key in `window` ([`FleetKeys::exhausted`]).
    fn exhausted_in(&self, window: Window) -> bool {
        self.exhausted.load(Ordering::Relaxed) == window.start
    }

    /// Notes an answer of Redis for this key in `window`.
    fn answered(&self, window: Window, answer: (u64, bool)) -> (u64, bool) {
        if !answer.1 {
            self.exhausted.store(window.start, Ordering::Relaxed);
        }
        answer
    }
}

fn usage_prefix(plan_id: &str) -> String {
    [PREFIX, ":usage:{", &key_part(plan_id), "}:"].concat()
}

/// `prefix` and `n` in decimal, in one allocation (`format!` costs several times more).
pub(super) fn with_number(prefix: &str, n: i64) -> String {
    let mut buf = itoa::Buffer::new();
    let n = buf.format(n);
    let mut k = String::with_capacity(prefix.len() + n.len());
    k.push_str(prefix);
    k.push_str(n);
    k
}

fn unavailable(e: FleetError) -> QuotaError {
    QuotaError::Unavailable(e.to_string())
}

/// Hours of usage one query reads at most (the retention period).
const MAX_USAGE_HOURS: i64 = 24 * 63;

impl QuotaStore for RedisQuotaStore {
    fn admit<'a>(
        &'a self,
        slot: &'a CounterSlot,
        plan_id: &'a str,
        key_id: &'a str,
        limit: u64,
        window: Window,
        now: i64,
    ) -> AdmitFuture<'a> {
        let keys = slot.fleet.get_or_init(|| FleetKeys::new(plan_id, key_id));
        let hour = now.div_euclid(3600) * 3600;
        let argv = Argv {
            limit,
            counter_expiry: window.end + COUNTER_GRACE_SECS,
        };
        let i = crate::worker::index();
        // A worker with no call under way sends a lone admission itself, from this future
        // (no task, no channel: an idle gateway's request pays for no group commit); the
        // admissions that come meanwhile wait in the queue for the next call, as under
        // load. Either way the call is what is bounded by `quota.timeout` (a queued
        // admission's by its call's first admission's arrival, see `Batches::flush`): no
        // timer per admission.
        //
        // Decided here: only a lone admission's future, which holds a whole call (~900
        // bytes), is boxed; a queued one is a few words, not boxed (see `AdmitFuture`).
        match self.batches.turn(i, keys, (window, hour), argv) {
            Turn::Alone(call) => AdmitFuture::Boxed(Box::pin(async move {
                let count = self.batches.call_one(keys, window, argv).await;
                drop(call);
                let reply = GroupReply::new(count?, 1, limit)?.nth(0);
                let answer = keys.answered(window, admission(reply));
                if answer.1 {
                    // (A request given up while its lone call is out is not counted in
                    // usage, though Redis may have counted it in the window.)
                    self.batches.count_usage(i, &keys.usage, hour);
                }
                Ok(answer)
            })),
            Turn::Queued(wait) => AdmitFuture::Queued(Queued { wait, keys, window }),
        }
    }

    /// A key Redis refused in this window is refused at once ([`FleetKeys::exhausted`]).
    fn admit_now(
        &self,
        slot: &CounterSlot,
        _plan_id: &str,
        _key_id: &str,
        limit: u64,
        window: Window,
        _now: i64,
    ) -> Option<Result<(u64, bool), QuotaError>> {
        let keys = slot.fleet.get()?;
        keys.exhausted_in(window).then_some(Ok((limit, false)))
    }

    fn usage<'a>(
        &'a self,
        plan_id: &'a str,
        from: i64,
        to: i64,
    ) -> BoxFuture<'a, Result<Vec<UsageRow>, QuotaError>> {
        Box::pin(async move {
            // This instance's counts first, so that its own requests show at once.
            if let Err(e) = self.push_usage().await {
                tracing::debug!(error = %e, "usage could not be pushed before a usage query");
            }
            let first = from.div_euclid(3600) * 3600;
            let hours: Vec<i64> = (0..MAX_USAGE_HOURS)
                .map(|i| first + i * 3600)
                .take_while(|h| *h < to)
                .collect();
            let prefix = usage_prefix(plan_id);
            let mut pipe = redis::pipe();
            for h in &hours {
                pipe.hgetall(with_number(&prefix, *h));
            }
            let maps: Vec<HashMap<String, u64>> = self
                .fleet()
                .call(|mut conn| async move { pipe.query_async(&mut conn).await })
                .await
                .map_err(unavailable)?;
            Ok(hours
                .iter()
                .zip(maps)
                .flat_map(|(hour, m)| {
                    m.into_iter().map(move |(key_id, count)| UsageRow {
                        key_id,
                        hour_start: *hour,
                        count,
                    })
                })
                .collect())
        })
    }

    /// Nothing to write: every admission is already in Redis (usage is sent by
    /// [`QuotaStore::push`]).
    fn flush(&self) -> Result<(), QuotaError> {
        Ok(())
    }

    fn push(&self) -> BoxFuture<'_, Result<(), QuotaError>> {
        Box::pin(self.push_usage())
    }

    /// Nothing to prune: keys carry their own expiry.
    fn prune(&self, _before: i64) -> Result<(), QuotaError> {
        Ok(())
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store whose Redis is not there: nothing listens on port 1, so every call fails
    /// at once.
    fn unreachable_store() -> Arc<RedisQuotaStore> {
        let cfg = crate::config::QuotaConfig {
            redis_url: "redis://127.0.0.1:1/0".into(),
            ..Default::default()
        };
        RedisQuotaStore::new(Fleet::start(&cfg).unwrap(), 3600)
    }

    /// An admission that finds its worker idle (no call under way, nothing queued, not
    /// busy) makes its own call; while a call is under way, or admissions wait, or the
    /// worker's last queued call carried several, the next one goes to the queue; a call
    /// stops counting as under way when it ends, failed or not.
    #[tokio::test]
    async fn a_lone_admission_calls_at_once_and_the_next_goes_to_the_queue() {
        let store = unreachable_store();
        let b = &store.batches;
        let i = crate::worker::index();
        let keys = FleetKeys::new("plan", "key");
        let window = Window { start: 0, end: 60 };
        let argv = Argv {
            limit: 10,
            counter_expiry: 3660,
        };
        let turn = || b.turn(i, &keys, (window, 0), argv);
        let queued = |t: Turn<'_>| match t {
            Turn::Queued(wait) => wait,
            Turn::Alone(_) => panic!("went alone, expected the queue"),
        };
        let alone = |t: Turn<'_>| matches!(t, Turn::Alone(_));
        let call = turn();
        assert!(
            matches!(call, Turn::Alone(_)),
            "an idle worker sends at once"
        );
        let wait = queued(turn());
        drop(call);
        assert!(
            wait.await.unwrap().is_err(),
            "no Redis: the queued call failed"
        );
        assert_eq!(b.queue(i).spare.len(), 1, "the answered call is kept");
        assert!(
            alone(turn()),
            "the calls are over and carried one each: idle"
        );
        // A queued call that carried two: the worker is busy, and its next admission
        // queues too, until a queued call carries just one.
        let call = turn();
        let two = [(); 2].map(|()| queued(turn()));
        assert!(b.queue(i).spare.is_empty(), "the kept call carries these");
        drop(call);
        for wait in two {
            assert!(wait.await.unwrap().is_err());
        }
        let one = queued(turn());
        assert!(
            one.await.unwrap().is_err(),
            "busy: queued though nothing is under way"
        );
        assert!(alone(turn()), "a queued call of one: idle again");
        // A lone admission through the store: its own call, which fails; then the worker
        // is idle again.
        let slot = CounterSlot::default();
        let r = store.admit(&slot, "plan", "key", 10, window, 30).await;
        assert!(matches!(r, Err(QuotaError::Unavailable(_))), "{r:?}");
        assert!(alone(turn()), "the lone call is over");
    }

    /// A push that Redis does not take keeps its counts for the next push: none is lost
    /// while Redis is away.
    #[tokio::test]
    async fn a_failed_push_keeps_its_counts_for_the_next() {
        let store = unreachable_store();
        let keys = FleetKeys::new("plan", "key");
        for _ in 0..3 {
            store
                .batches
                .count_usage(crate::worker::index(), &keys.usage, 7200);
        }
        assert!(store.push().await.is_err(), "no Redis to push to");
        let kept = store.batches.take_usage();
        let want = super::super::fleet_usage::totals(&[("scpgw:usage:{plan}:7200", "key", 3)]);
        assert_eq!(kept.totals(), want);
        // Nothing counted: nothing to push, and no call.
        assert!(store.push().await.is_ok());
    }

    /// A Redis that answers every command with `+OK` except `EVALSHA`, which it never
    /// answers (a server gone silent in the middle of the admissions).
    async fn silent_on_evalsha() -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = sock.read(&mut buf).await {
                        seen.extend_from_slice(&buf[..n]);
                        // Commands are arrays of bulk strings: `*N`, then `$len` and the
                        // argument for each.
                        while let Some(name) = next_command(&mut seen) {
                            if !name.eq_ignore_ascii_case(b"EVALSHA")
                                && sock.write_all(b"+OK\r\n").await.is_err()
                            {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    /// Takes the first whole command off `seen`: its name.
    fn next_command(seen: &mut Vec<u8>) -> Option<Vec<u8>> {
        let line = |at: usize| -> Option<(usize, usize)> {
            let end = at + seen.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
            let n = std::str::from_utf8(&seen[at + 1..end]).ok()?.parse().ok()?;
            Some((n, end + 2))
        };
        let (args, mut at) = line(0)?;
        let mut name = None;
        for _ in 0..args {
            let (len, start) = line(at)?;
            at = start + len + 2;
            if at > seen.len() {
                return None;
            }
            name.get_or_insert_with(|| seen[start..start + len].to_vec());
        }
        seen.drain(..at);
        name
    }

    /// A queued admission's call to a Redis that does not answer is given up at
    /// `quota.timeout`, as a lone one's: no admission waits on (it has no timer of its
    /// own; the call's counts from its first admission).
    #[tokio::test]
    async fn a_queued_admission_is_given_up_at_the_timeout() {
        let addr = silent_on_evalsha().await;
        let timeout = std::time::Duration::from_millis(50);
        let cfg = crate::config::QuotaConfig {
            redis_url: format!("redis://{addr}/0"),
            timeout,
            ..Default::default()
        };
        let store = RedisQuotaStore::new(Fleet::start(&cfg).unwrap(), 3600);
        let window = Window { start: 0, end: 60 };
        let slot = CounterSlot::default();
        // Lone admissions until one reaches the server (before that: not connected).
        let given_up = format!("{:?}", Some(unavailable(FleetError::Timeout(timeout))));
        let mut lone = String::new();
        for _ in 0..500 {
            let r = store.admit(&slot, "plan", "key", 10, window, 30).await;
            lone = format!("{:?}", r.err());
            if lone == given_up {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(lone, given_up, "a lone admission to a silent Redis");
        // A call under way (its marker only): the next admission is queued, and its
        // call, to the same silent server, is given up too.
        let b = &store.batches;
        let i = crate::worker::index();
        let keys = FleetKeys::new("plan", "key");
        let argv = Argv {
            limit: 10,
            counter_expiry: 3660,
        };
        let call = b.turn(i, &keys, (window, 0), argv);
        assert!(matches!(call, Turn::Alone(_)));
        let Turn::Queued(wait) = b.turn(i, &keys, (window, 0), argv) else {
            panic!("went alone, expected the queue");
        };
        // Generous: the timeout is 50 ms; without a bound the wait would never end.
        let answer = tokio::time::timeout(100 * timeout, wait)
            .await
            .expect("the queued admission was not given up");
        assert_eq!(format!("{:?}", answer.unwrap().err()), given_up);
        drop(call);
    }

    #[test]
    fn a_reply_carries_each_admissions_count_in_order() {
        assert_eq!(counts("3", 1).unwrap(), [3]);
        assert_eq!(counts("1,-1,7,0", 4).unwrap(), [1, -1, 7, 0]);
        // A reply that does not match the call is an error for every admission of it.
        assert!(counts("1,2", 3).is_err());
        assert!(counts("1,x", 2).is_err());
        assert!(counts("", 1).is_err());
    }

    #[test]
    fn one_integer_carries_the_count_and_the_decision() {
        assert_eq!(admission(1), (1, true));
        assert_eq!(admission(42), (42, true));
        assert_eq!(admission(-42), (42, false));
        // A plan with a limit of 0 refuses the first call: count 0, refused.
        assert_eq!(admission(0), (0, false));
    }

    /// Each group's keys and arguments, as a reused call's buffers hold them: what the
    /// crate's own command would carry, and only the last admission's after a reuse.
    #[test]
    fn a_reused_call_carries_what_a_command_would() {
        let keys = FleetKeys::new("plan", "k:1");
        let w = |start| Window {
            start,
            end: start + 60,
        };
        let argv = |limit| Argv {
            limit,
            counter_expiry: -3660,
        };
        let written = |p: &Pending| -> Vec<Vec<u8>> {
            p.keys
                .iter()
                .chain(p.argv.iter())
                .map(<[u8]>::to_vec)
                .collect()
        };
        let as_cmd = |window, limit| -> Vec<Vec<u8>> {
            use redis::ToRedisArgs;
            let (mut k, mut a) = (redis::Cmd::new(), redis::Cmd::new());
            keys.counter_key(window).write_redis_args(&mut k);
            add_argv(&mut a, argv(limit));
            k.args_iter()
                .chain(a.args_iter())
                .map(|arg| match arg {
                    redis::Arg::Simple(b) => b.to_vec(),
                    redis::Arg::Cursor => panic!("no cursor"),
                })
                .collect()
        };
        let answer = || tokio::sync::oneshot::channel().0;
        let mut p = Pending::new(0, 1);
        p.add(&keys, (w(0), 3600), argv(10), answer());
        assert_eq!(written(&p), as_cmd(w(0), 10));
        p.add(&keys, (w(60), 3600), argv(7), answer());
        assert_eq!(written(&p).len(), 6, "a key and two arguments per group");
        let p = p.reuse(5, 3);
        assert!(written(&p).is_empty());
        assert!(p.groups.is_empty() && p.answers.is_empty());
        assert_eq!(p.slot, 5);
        let mut p = p;
        p.add(&keys, (w(120), 3600), argv(u64::MAX), answer());
        assert_eq!(written(&p), as_cmd(w(120), u64::MAX));
        let text: Vec<String> = written(&p)
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        assert_eq!(text[1..], [&u64::MAX.to_string(), "-3660"], "{text:?}");
        let names: Vec<&[u8]> = p.names.iter().collect();
        assert_eq!(
            names,
            [&b"scpgw:usage:{plan}:"[..], b"k:1"],
            "the usage name"
        );
    }

    /// Once a call is answered, each group's admitted requests (not its refused ones) are
    /// counted in the usage hour of its key, under the key's own name.
    #[test]
    fn an_answered_call_counts_what_it_admitted_in_usage() {
        let (a, b, c) = (
            FleetKeys::new("plan", "a"),
            FleetKeys::new("plan", "b"),
            FleetKeys::new("plan", "c"),
        );
        let w = Window { start: 0, end: 60 };
        let argv = |limit| Argv {
            limit,
            counter_expiry: 3660,
        };
        let answer = || tokio::sync::oneshot::channel().0;
        let mut p = Pending::new(0, 8);
        for _ in 0..3 {
            p.add(&a, (w, 0), argv(10), answer());
        }
        p.add(&a, (w, 3600), argv(10), answer());
        p.add(&b, (w, 0), argv(1), answer());
        p.add(&b, (w, 0), argv(1), answer());
        p.add(&c, (w, 0), argv(5), answer());
        // Redis's counts: a from 0 → 3, then 3 → 4 in the next hour; b from 0 → 2 with a
        // limit of 1 (one admitted); c already at its limit (none admitted).
        for (g, count) in p.groups.iter_mut().zip([3, 4, 2, 6]) {
            g.reply = GroupReply::new(count, g.n, g.limit).unwrap();
        }
        let mut usage = Tally::default();
        p.count_usage(&mut usage);
        let want = super::super::fleet_usage::totals(&[
            ("scpgw:usage:{plan}:0", "a", 3),
            ("scpgw:usage:{plan}:0", "b", 1),
            ("scpgw:usage:{plan}:3600", "a", 1),
        ]);
        assert_eq!(usage.totals(), want);
    }

    /// Admissions of one counter (key, window, limit, usage hour) in one call make one
    /// group, whose keys and arguments are written once; any difference starts a group.
    #[test]
    fn admissions_of_one_counter_go_as_one_group() {
        let (a, b) = (FleetKeys::new("plan", "a"), FleetKeys::new("plan", "b"));
        // The same key compiled again (a reload): the same counter.
        let a_again = FleetKeys::new("plan", "a");
        // Another plan's key of the same id: another counter.
        let a_elsewhere = FleetKeys::new("plan2", "a");
        let w = |start| Window {
            start,
            end: start + 60,
        };
        let argv = |limit, _key_id: &str| Argv {
            limit,
            counter_expiry: 3660,
        };
        let answer = || tokio::sync::oneshot::channel().0;
        let mut p = Pending::new(0, 8);
        p.add(&a, (w(0), 0), argv(10, "a"), answer());
        p.add(&b, (w(0), 0), argv(10, "b"), answer());
        p.add(&a, (w(0), 0), argv(10, "a"), answer());
        p.add(&a_again, (w(0), 0), argv(10, "a"), answer());
        assert_eq!(p.groups.iter().map(|g| g.n).collect::<Vec<_>>(), [3, 1]);
        let groups: Vec<usize> = p.answers.iter().map(|(g, _)| *g).collect();
        assert_eq!(groups, [0, 1, 0, 0], "each answer knows its group");
        assert_eq!(p.keys.iter().count(), 2, "one key per group");
        assert_eq!(p.argv.iter().count(), 4, "two arguments per group");
        p.add(&a_elsewhere, (w(0), 0), argv(10, "a"), answer());
        p.add(&a, (w(60), 0), argv(10, "a"), answer());
        p.add(&a, (w(0), 3600), argv(10, "a"), answer());
        p.add(&a, (w(0), 0), argv(11, "a"), answer());
        assert_eq!(p.groups.len(), 6, "another plan, window, hour or limit");
        assert_eq!(p.answers.len(), 8);
        // A counter whose group is further back than the groups looked at starts another.
        let mut p = Pending::new(0, 16);
        let others: Vec<FleetKeys> = (0..GROUPS_LOOKED_AT)
            .map(|i| FleetKeys::new("plan", &format!("k{i}")))
            .collect();
        p.add(&a, (w(0), 0), argv(10, "a"), answer());
        for k in &others {
            p.add(k, (w(0), 0), argv(10, "k"), answer());
        }
        p.add(&a, (w(0), 0), argv(10, "a"), answer());
        assert_eq!(p.groups.len(), GROUPS_LOOKED_AT + 2);
    }

    /// A group's reply gives each of its admissions what it would have got alone, one
    /// after the other (the script before groups: increment, and take it back if over).
    #[test]
    fn a_group_answers_each_admission_as_one_at_a_time_would() {
        for before in 0..6i64 {
            for n in 1..6usize {
                for limit in [0u64, 1, 3, 5, 8, u64::MAX] {
                    let mut count = before;
                    let alone: Vec<i64> = (0..n)
                        .map(|_| {
                            count += 1;
                            if count <= i64::try_from(limit).unwrap_or(i64::MAX) {
                                count
                            } else {
                                count -= 1;
                                -count
                            }
                        })
                        .collect();
                    let after_incrby = before + i64::try_from(n).unwrap();
                    let g = GroupReply::new(after_incrby, n, limit).unwrap();
                    let grouped: Vec<i64> = (0..n).map(|j| g.nth(j)).collect();
                    assert_eq!(
                        grouped, alone,
                        "before {before}, {n} admissions, limit {limit}"
                    );
                    // The counter ends where one at a time leaves it.
                    assert_eq!(g.before + g.admitted, count);
                }
            }
        }
        // A count below the group's own admissions is not Redis's answer to this call.
        assert!(GroupReply::new(2, 3, 10).is_err());
        assert!(GroupReply::new(i64::MIN, 1, 10).is_err());
    }

    /// The one argument a key name writes into a command.
    fn arg(key: Numbered<'_>) -> String {
        use redis::ToRedisArgs;
        let [one] = <[Vec<u8>; 1]>::try_from(key.to_redis_args()).expect("one argument");
        String::from_utf8(one).unwrap()
    }

    #[test]
    fn keys_are_named_from_stable_ids() {
        let w = Window {
            start: 1_790_000_000,
            end: 1_790_003_600,
        };
        let keys = FleetKeys::new("up-1", "k:1");
        assert_eq!(
            arg(keys.counter_key(w)),
            "scpgw:quota:{up-1}:k%3A1:1790000000"
        );
        assert_eq!(
            arg(keys.usage_key(1_790_000_000)),
            "scpgw:usage:{up-1}:1790000000"
        );
        // The usage API reads the hours the admissions wrote.
        assert_eq!(
            with_number(&usage_prefix("up-1"), 1_790_000_000),
            arg(keys.usage_key(1_790_000_000))
        );
        // A name too long for the stack buffer is written whole too.
        let long = FleetKeys::new(&"p".repeat(300), "k");
        let name = arg(long.usage_key(-7));
        assert!(
            name.starts_with("scpgw:usage:{ppp") && name.ends_with("p}:-7"),
            "{name}"
        );
        assert_eq!(name.len(), "scpgw:usage:{}:-7".len() + 300);
    }

    #[test]
    fn an_admission_stays_in_one_slot_and_plans_spread_over_the_masters() {
        use redis::cluster_routing::get_slot;
        let w = Window {
            start: 1_790_000_000,
            end: 1_790_003_600,
        };
        let mut thirds = [0; 3];
        for i in 0..100 {
            let plan = format!("plan-{i}");
            let keys = FleetKeys::new(&plan, "k:{1}");
            let counter = get_slot(arg(keys.counter_key(w)).as_bytes());
            // The slot the admission's call is grouped by.
            assert_eq!(counter, keys.slot);
            assert_eq!(
                counter,
                get_slot(arg(keys.usage_key(1_790_000_000)).as_bytes())
            );
            assert_eq!(
                counter,
                get_slot(arg(keys.usage_key(1_790_003_600)).as_bytes())
            );
            // How `redis-cli --cluster create` splits the slots over 3 masters.
            thirds[usize::from(counter) * 3 / 16384] += 1;
        }
        assert!(thirds.iter().all(|n| *n >= 20), "{thirds:?}");
    }
}
