//! Throttling with governor (`request-pipeline.md`, "Throttling"): a GCRA bucket per stage
//! and one per API key of a usage plan. Buckets are kept by stable ids (API, stage, plan)
//! outside the snapshot, so a reload does not refill them; a changed rate or burst
//! replaces the bucket.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

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

struct StageBucket {
    spec: ThrottleSpec,
    limiter: DefaultDirectRateLimiter,
}

struct KeyBuckets {
    spec: ThrottleSpec,
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
}

#[derive(Default)]
pub struct Throttles {
    stages: DashMap<(Arc<str>, Arc<str>), Arc<StageBucket>>,
    plans: DashMap<Arc<str>, Arc<KeyBuckets>>,
}

impl Throttles {
    /// Takes one token from the stage bucket; `Err(retry_after_secs)` when empty.
    pub fn check_stage(
        &self,
        api: &Arc<str>,
        stage: &Arc<str>,
        spec: ThrottleSpec,
    ) -> Result<(), u64> {
        let key = (api.clone(), stage.clone());
        let bucket = match self.stages.get(&key) {
            Some(b) if b.spec == spec => b.clone(),
            _ => {
                let b = Arc::new(StageBucket {
                    spec,
                    limiter: DefaultDirectRateLimiter::direct(quota(spec)),
                });
                self.stages.insert(key, b.clone());
                b
            }
        };
        bucket.limiter.check().map_err(|not_until| {
            retry_secs(not_until.wait_time_from(DefaultClock::default().now()))
        })
    }

    /// Takes one token from the bucket of `key_id` under `plan`.
    pub fn check_key(
        &self,
        plan: &Arc<str>,
        key_id: &Arc<str>,
        spec: ThrottleSpec,
    ) -> Result<(), u64> {
        let buckets = match self.plans.get(plan) {
            Some(b) if b.spec == spec => b.clone(),
            _ => {
                let b = Arc::new(KeyBuckets {
                    spec,
                    limiter: DefaultKeyedRateLimiter::keyed(quota(spec)),
                });
                self.plans.insert(plan.clone(), b.clone());
                b
            }
        };
        buckets.limiter.check_key(key_id).map_err(|not_until| {
            retry_secs(not_until.wait_time_from(DefaultClock::default().now()))
        })
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
        for _ in 0..3 {
            assert!(t.check_stage(&api, &stage, spec).is_ok());
        }
        let retry = t.check_stage(&api, &stage, spec).unwrap_err();
        assert!((1..=2).contains(&retry), "{retry}");
        // Per key: each key has its own bucket.
        let (plan, k1, k2): (Arc<str>, Arc<str>, Arc<str>) =
            ("up".into(), "k1".into(), "k2".into());
        let spec = ThrottleSpec {
            rate_per_second: 1.0,
            burst: 1,
        };
        assert!(t.check_key(&plan, &k1, spec).is_ok());
        assert!(t.check_key(&plan, &k1, spec).is_err());
        assert!(t.check_key(&plan, &k2, spec).is_ok());
        assert_eq!(retry_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_secs(Duration::ZERO), 1);
    }
}
