//! Throttling with governor (`request-pipeline.md`, "Throttling"): a GCRA bucket per stage
//! and one per API key of a usage plan. Buckets are kept by stable ids (API and stage, plan
//! and key) outside the snapshot, so a reload does not refill them; a changed rate or burst
//! replaces the bucket. A compiled stage or key finds its bucket once ([`BucketSlot`]).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};

use super::apikey::ThrottleSpec;

fn quota(spec: ThrottleSpec) -> Quota {
    let burst = NonZeroU32::new(spec.burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(spec.period())
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst)
}

/// `Retry-After` in whole seconds (at least 1).
fn retry_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

/// One GCRA bucket and the rate it was made for.
struct Bucket {
    spec: ThrottleSpec,
    limiter: DefaultDirectRateLimiter,
}

impl Bucket {
    fn new(spec: ThrottleSpec) -> Self {
        Self {
            spec,
            limiter: DefaultDirectRateLimiter::direct(quota(spec)),
        }
    }

    fn take(&self) -> Result<(), u64> {
        self.limiter.check().map_err(|not_until| {
            retry_secs(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }
}

/// Where a compiled stage (or a compiled key of a usage plan) finds its bucket: resolved on
/// its first request, so that the next ones take a token without building an id pair,
/// hashing it and locking a shard of the map. Tagged with the [`Throttles`] it came from
/// (a snapshot outlives none in the gateway, but tests build several).
#[derive(Default)]
pub struct BucketSlot(OnceLock<(u64, Arc<Bucket>)>);

impl std::fmt::Debug for BucketSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.get() {
            Some((_, b)) => write!(f, "BucketSlot({:?})", b.spec),
            None => f.write_str("BucketSlot(empty)"),
        }
    }
}

type Buckets = DashMap<(Arc<str>, Arc<str>), Arc<Bucket>>;

/// The buckets, by stable ids: (API, stage) and (usage plan, key). They outlive snapshots
/// (a reload does not refill them) and are found by a compiled stage or key once, through
/// its [`BucketSlot`].
pub struct Throttles {
    /// Tells this instance's slots from another's.
    id: u64,
    stages: Buckets,
    keys: Buckets,
}

impl Default for Throttles {
    fn default() -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            stages: Buckets::default(),
            keys: Buckets::default(),
        }
    }
}

impl Throttles {
    /// Takes one token from the bucket of stage `stage` of API `api` (found through `slot`,
    /// the compiled stage's); `Err(retry_after_secs)` when empty.
    pub fn check_stage(
        &self,
        slot: &BucketSlot,
        api: &Arc<str>,
        stage: &Arc<str>,
        spec: ThrottleSpec,
    ) -> Result<(), u64> {
        self.take(slot, &self.stages, (api, stage), spec)
    }

    /// Takes one token from the bucket of `key_id` under `plan` (found through `slot`, the
    /// compiled key's).
    pub fn check_key(
        &self,
        slot: &BucketSlot,
        plan: &Arc<str>,
        key_id: &Arc<str>,
        spec: ThrottleSpec,
    ) -> Result<(), u64> {
        self.take(slot, &self.keys, (plan, key_id), spec)
    }

    fn take(
        &self,
        slot: &BucketSlot,
        map: &Buckets,
        ids: (&Arc<str>, &Arc<str>),
        spec: ThrottleSpec,
    ) -> Result<(), u64> {
        let (owner, bucket) = slot
            .0
            .get_or_init(|| (self.id, Self::resolve(map, ids, spec)));
        if *owner == self.id && bucket.spec == spec {
            return bucket.take();
        }
        Self::resolve(map, ids, spec).take()
    }

    /// The bucket of `ids`; a new one if there is none or it was made for another rate.
    fn resolve(map: &Buckets, (a, b): (&Arc<str>, &Arc<str>), spec: ThrottleSpec) -> Arc<Bucket> {
        let key = (a.clone(), b.clone());
        // The map's guard is dropped before the insert: held across it (as a `match` on
        // `get` holds it), the shard's read lock would wait for its own write lock forever.
        if let Some(b) = map.get(&key).map(|b| b.clone()).filter(|b| b.spec == spec) {
            return b;
        }
        let b = Arc::new(Bucket::new(spec));
        map.insert(key, b.clone());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_throttled_with_retry_after() {
        let t = Throttles::default();
        let (api, stage): (Arc<str>, Arc<str>) = ("a".into(), "prod".into());
        let spec = ThrottleSpec {
            rate_per_second: 0.5,
            burst: 3,
        };
        let slot = BucketSlot::default();
        for _ in 0..3 {
            assert!(t.check_stage(&slot, &api, &stage, spec).is_ok());
        }
        let retry = t.check_stage(&slot, &api, &stage, spec).unwrap_err();
        assert!((1..=2).contains(&retry), "{retry}");
        // Per key: each key has its own bucket.
        let (plan, k1, k2): (Arc<str>, Arc<str>, Arc<str>) =
            ("up".into(), "k1".into(), "k2".into());
        let spec = ThrottleSpec {
            rate_per_second: 1.0,
            burst: 1,
        };
        let (s1, s2) = (BucketSlot::default(), BucketSlot::default());
        assert!(t.check_key(&s1, &plan, &k1, spec).is_ok());
        assert!(t.check_key(&s1, &plan, &k1, spec).is_err());
        assert!(t.check_key(&s2, &plan, &k2, spec).is_ok());
        assert_eq!(retry_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_secs(Duration::ZERO), 1);
    }

    #[test]
    fn a_reload_keeps_the_bucket_and_a_new_rate_replaces_it() {
        let t = Throttles::default();
        let (api, stage): (Arc<str>, Arc<str>) = ("a".into(), "prod".into());
        let spec = ThrottleSpec {
            rate_per_second: 0.001,
            burst: 2,
        };
        let before = BucketSlot::default();
        assert!(t.check_stage(&before, &api, &stage, spec).is_ok());
        // The same stage compiled again (a reload): its slot finds the same bucket.
        let after = BucketSlot::default();
        assert!(t.check_stage(&after, &api, &stage, spec).is_ok());
        assert!(t.check_stage(&after, &api, &stage, spec).is_err());
        assert!(t.check_stage(&before, &api, &stage, spec).is_err());
        // A new burst: a new, full bucket.
        let wider = ThrottleSpec { burst: 3, ..spec };
        let new = BucketSlot::default();
        for _ in 0..3 {
            assert!(t.check_stage(&new, &api, &stage, wider).is_ok());
        }
        assert!(t.check_stage(&new, &api, &stage, wider).is_err());
        // Keys likewise, and a key's bucket is not its stage's.
        let (plan, k): (Arc<str>, Arc<str>) = ("up".into(), "k".into());
        let (k1, k2) = (BucketSlot::default(), BucketSlot::default());
        assert!(t.check_key(&k1, &plan, &k, spec).is_ok());
        assert!(t.check_key(&k2, &plan, &k, spec).is_ok());
        assert!(t.check_key(&k1, &plan, &k, spec).is_err());
    }

    #[test]
    fn a_slot_of_other_throttles_takes_from_these() {
        let (one, two) = (Throttles::default(), Throttles::default());
        let (api, stage): (Arc<str>, Arc<str>) = ("a".into(), "prod".into());
        let spec = ThrottleSpec {
            rate_per_second: 0.001,
            burst: 1,
        };
        let slot = BucketSlot::default();
        assert!(one.check_stage(&slot, &api, &stage, spec).is_ok());
        assert!(two.check_stage(&slot, &api, &stage, spec).is_ok());
        assert!(two.check_stage(&slot, &api, &stage, spec).is_err());
    }
}
