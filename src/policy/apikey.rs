//! API keys (`request-pipeline.md`, "API keys and usage-plan quotas"): the `x-scp-apikey`
//! header, looked up by SHA-256 digest and confirmed with a constant-time comparison.
//! Lookup by digest leaks at most which digests share a prefix with the digest of the
//! presented value, which says nothing about any key (SHA-256 has no usable preimages).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::HeaderValue;
use rustc_hash::FxHashMap;
use subtle::ConstantTimeEq;

use crate::rejection::AuthFailure;
use crate::snapshot::model::{QuotaRate, UsagePlan};

pub static HEADER: http::HeaderName = http::HeaderName::from_static("x-scp-apikey");

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ThrottleSpec {
    pub rate_per_second: f64,
    pub burst: u32,
}

impl ThrottleSpec {
    pub fn from_model(t: &crate::snapshot::model::Throttle) -> Self {
        Self {
            rate_per_second: t.rate_per_second,
            burst: t.burst,
        }
    }

    /// One token's refill time.
    pub fn period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.rate_per_second)
    }
}

#[derive(Debug)]
pub struct CompiledPlan {
    pub id: Arc<str>,
    pub limit: u64,
    pub rate: QuotaRate,
    pub throttle: Option<ThrottleSpec>,
    /// `limit` as a `RateLimit-Limit` value.
    pub limit_header: HeaderValue,
    /// The quota window in force (computed once per window, not per request).
    pub window: crate::policy::quota::WindowCache,
    /// The plan's keys; a key's [`ApiKey::index`] is its place here.
    keys: Box<[Arc<ApiKey>]>,
    /// SHA-256 digest → the key's index. Fx hashing: the digests are uniform and cannot be
    /// steered (SipHash, std's default against chosen keys, costs ten times more per
    /// request).
    digests: FxHashMap<[u8; 32], u32>,
    /// Values presented before and found, per worker: a value's SHA-256 is made once per
    /// worker, not per request.
    found: FoundKeys,
}

/// The values of a plan's keys that requests presented and that were found, one map per
/// worker (see [`crate::worker`]): the value's tag → the key's index (a found value needs
/// no second lookup).
///
/// Why: SHA-256 of the presented value is the one expensive step of a key check. With
/// the CPU's SHA extensions it is ~100 ns; without them (Intel before Ice Lake, still
/// common in clouds; and under valgrind, which the load bench's instruction count runs
/// in) it is ~3,600 instructions, a tenth of a whole proxied request with a key.
/// A tag is SipHash-1-3, 128 bits, keyed with random keys made for each compiled plan
/// (~100 instructions for a usual key).
///
/// What it holds, and why that is safe:
/// - only values that were found: a value that is no key never enters, so a client
///   sending random values cannot fill it; it holds at most one entry per secret of the
///   plan's keys (a value is found only if it is one, byte for byte);
/// - tags, not values: nothing here is a key's secret, and a tag says no more about one
///   than the digests the plan keeps anyway (and less: its SipHash keys are random per
///   process and snapshot). Two values with one tag (2^-128 for a chosen pair under an
///   unknown key) are out of reach of a client, who cannot compute tags;
/// - per compiled plan: a new snapshot (a key revoked, a secret rotated) starts empty.
///
/// Each worker has its own map behind its own lock (the lock is never contended: the
/// threads that are not workers share the extra one), on its own cache line.
struct FoundKeys {
    tagger: siphasher::sip128::SipHasher13,
    shards: Box<[FoundShard]>,
}

#[repr(align(64))]
#[derive(Default)]
struct FoundShard(Mutex<FxHashMap<u128, u32>>);

impl FoundKeys {
    fn new() -> Self {
        Self {
            tagger: siphasher::sip128::SipHasher13::new_with_keys(rand::random(), rand::random()),
            shards: (0..crate::worker::shards())
                .map(|_| FoundShard::default())
                .collect(),
        }
    }

    fn tag(&self, presented: &[u8]) -> u128 {
        self.tagger.hash(presented).into()
    }

    /// The current worker's map.
    fn shard(&self) -> std::sync::MutexGuard<'_, FxHashMap<u128, u32>> {
        let shard = &self.shards[crate::worker::index().min(self.shards.len() - 1)];
        // A panic while held cannot leave the map half-changed (one insert or get).
        shard
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for FoundKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Counts only: tags and digests have no place in a log.
        f.debug_struct("FoundKeys")
            .field(
                "entries",
                &self
                    .shards
                    .iter()
                    .map(|s| s.0.lock().map_or(0, |m| m.len()))
                    .sum::<usize>(),
            )
            .finish()
    }
}

/// A key of a usage plan, as requests that present it need it.
#[derive(Debug)]
pub struct ApiKey {
    pub id: Arc<str>,
    /// The key's place in its plan (see [`StageKeys::allowed`]).
    pub index: u32,
    /// `id` as the `x-scp-api-key-id` value forwarded to backends.
    pub header: Option<HeaderValue>,
    /// Where the quota store keeps this key's counter under its plan.
    pub quota: crate::policy::quota::CounterSlot,
    /// Where this key's throttle bucket under its plan is (when the plan throttles).
    pub throttle: crate::policy::throttle::BucketSlot,
}

impl CompiledPlan {
    pub fn compile(p: &UsagePlan) -> Self {
        // Every secret of a key (primary and secondary) maps to the one key: both count as
        // the same key id for quotas, throttling, usage and `x-scp-api-key-id`.
        let mut digests = FxHashMap::default();
        let mut keys = Vec::with_capacity(p.api_keys.len());
        for k in &p.api_keys {
            // A snapshot's plan has far fewer than 2^32 keys (each is a JSON object).
            let index = u32::try_from(keys.len()).unwrap_or(u32::MAX);
            keys.push(Arc::new(ApiKey {
                id: Arc::from(k.id.as_str()),
                index,
                header: crate::interned::header_value(&k.id),
                quota: Default::default(),
                throttle: Default::default(),
            }));
            for digest in k.digests().flatten() {
                digests.insert(digest, index);
            }
        }
        Self {
            id: Arc::from(p.id.as_str()),
            limit: p.limit,
            rate: p.rate,
            throttle: p.throttle.as_ref().map(ThrottleSpec::from_model),
            limit_header: crate::interned::header_value(&p.limit.to_string())
                .unwrap_or_else(|| HeaderValue::from(p.limit)),
            window: Default::default(),
            keys: keys.into(),
            digests,
            found: FoundKeys::new(),
        }
    }

    /// The key whose value is `presented`: from the worker's values found before
    /// ([`FoundKeys`]), else by its digest (and then remembered).
    pub fn find(&self, presented: &[u8]) -> Option<&Arc<ApiKey>> {
        let tag = self.found.tag(presented);
        let known = self.found.shard().get(&tag).copied();
        let index = match known {
            Some(index) => index,
            None => {
                let index = self.find_by_digest(presented)?;
                self.found.shard().insert(tag, index);
                index
            }
        };
        self.keys.get(index as usize)
    }

    /// The index of the key whose value is `presented`, by the value's SHA-256 digest.
    fn find_by_digest(&self, presented: &[u8]) -> Option<u32> {
        let digest = crate::snapshot::model::sha256(presented);
        let (stored, index) = self.digests.get_key_value(&digest)?;
        // Compared a word at a time (subtle compares a byte slice byte by byte).
        let words = |d: &[u8; 32]| -> [u64; 4] {
            std::array::from_fn(|i| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&d[i * 8..i * 8 + 8]);
                u64::from_ne_bytes(w)
            })
        };
        bool::from(words(stored)[..].ct_eq(&words(&digest)[..])).then_some(*index)
    }
}

/// The key rules of one stage: its usage plan and, when listed, the keys it accepts.
#[derive(Debug, Default)]
pub struct StageKeys {
    pub plan: Option<Arc<CompiledPlan>>,
    /// When the stage lists its keys: for each key of the plan, by [`ApiKey::index`],
    /// whether it is listed (ids that are no key of the plan are left out: no value can
    /// be one of them).
    pub allowed: Option<Box<[bool]>>,
}

impl StageKeys {
    /// The rules of a stage with usage plan `plan` and, if it lists them, keys `listed`
    /// (ids).
    pub fn new<'a>(
        plan: Option<Arc<CompiledPlan>>,
        listed: Option<impl IntoIterator<Item = &'a str>>,
    ) -> Self {
        let allowed = listed.map(|ids| {
            let keys = plan.as_ref().map_or(&[][..], |p| &p.keys[..]);
            // Ids to places once, so that a long list against a large plan stays linear.
            let by_id: FxHashMap<&str, usize> =
                keys.iter().map(|k| (&*k.id, k.index as usize)).collect();
            let mut allowed = vec![false; keys.len()];
            for i in ids.into_iter().filter_map(|id| by_id.get(id)) {
                allowed[*i] = true;
            }
            allowed.into()
        });
        Self { plan, allowed }
    }
}

impl StageKeys {
    /// The key `presented` (the request's first `x-scp-apikey`), with its plan. A stage
    /// without a plan says `no_usage_plan` whether or not a key was sent: no key can pass
    /// there, and that is what its operator needs to read.
    pub fn check(
        &self,
        presented: Option<&http::HeaderValue>,
    ) -> Result<(&CompiledPlan, &ApiKey), AuthFailure> {
        let plan = self.plan.as_ref().ok_or(AuthFailure::NoUsagePlan)?;
        let presented = presented.ok_or(AuthFailure::MissingKey)?;
        let key = plan
            .find(presented.as_bytes())
            .ok_or(AuthFailure::UnknownKey)?;
        if let Some(allowed) = &self.allowed {
            if !allowed.get(key.index as usize).copied().unwrap_or(false) {
                return Err(AuthFailure::KeyNotAllowed);
            }
        }
        Ok((plan, key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Arc<CompiledPlan> {
        let p: UsagePlan = serde_json::from_value(serde_json::json!({
            "id": "up01", "name": "basic", "limit": 10, "rate": "day",
            "api_keys": [
                {"id": "k01", "name": "mobile", "key_sha256": "7a336e272192af4a2c17594309c9041425cb9ed3aa05fe3f4687dd6fbb8638a7"},
                {"id": "k02", "name": "web", "key": "plain-key-value"}
            ]
        }))
        .unwrap();
        Arc::new(CompiledPlan::compile(&p))
    }

    fn hdr(v: &str) -> Option<http::HeaderValue> {
        Some(v.parse().unwrap())
    }

    fn found_entries(p: &CompiledPlan) -> usize {
        p.found
            .shards
            .iter()
            .map(|s| s.0.lock().unwrap().len())
            .sum()
    }

    #[test]
    fn values_found_are_remembered_and_no_other_value_enters() {
        let p = plan();
        assert_eq!(found_entries(&p), 0);
        for _ in 0..3 {
            assert_eq!(&*p.find(b"plain-key-value").unwrap().id, "k02");
        }
        assert_eq!(found_entries(&p), 1, "one entry for a value found thrice");
        for v in ["nope", "plain-key-valuE", "plain-key-value ", ""] {
            assert!(p.find(v.as_bytes()).is_none(), "{v:?}");
        }
        assert_eq!(found_entries(&p), 1, "values that are no key never enter");
        assert_eq!(&*p.find(b"mobile-app-key-0001").unwrap().id, "k01");
        assert_eq!(&*p.find(b"mobile-app-key-0001").unwrap().id, "k01");
        assert_eq!(&*p.find(b"plain-key-value").unwrap().id, "k02");
        assert_eq!(found_entries(&p), 2);
        // The debug view shows how many, never what.
        let shown = format!("{p:?}");
        assert!(shown.contains("entries: 2"), "{shown}");
    }

    #[test]
    fn keys_by_digest_and_stage_lists() {
        let all = StageKeys {
            plan: Some(plan()),
            allowed: None,
        };
        assert_eq!(
            &*all.check(hdr("mobile-app-key-0001").as_ref()).unwrap().1.id,
            "k01"
        );
        assert_eq!(
            &*all.check(hdr("plain-key-value").as_ref()).unwrap().1.id,
            "k02"
        );
        assert_eq!(
            all.check(hdr("nope").as_ref()).unwrap_err(),
            AuthFailure::UnknownKey
        );
        assert_eq!(all.check(None).unwrap_err(), AuthFailure::MissingKey);
        let only_k02 = StageKeys::new(Some(plan()), Some(["k02", "k99"]));
        assert_eq!(
            only_k02
                .check(hdr("mobile-app-key-0001").as_ref())
                .unwrap_err(),
            AuthFailure::KeyNotAllowed
        );
        // The listed key passes, found by digest the first time and then among the
        // worker's values found; an id that is no key of the plan lets nothing through.
        for _ in 0..2 {
            assert_eq!(
                &*only_k02
                    .check(hdr("plain-key-value").as_ref())
                    .unwrap()
                    .1
                    .id,
                "k02"
            );
        }
        let only_k01 = StageKeys::new(Some(plan()), Some(["k01"]));
        assert_eq!(
            &*only_k01
                .check(hdr("mobile-app-key-0001").as_ref())
                .unwrap()
                .1
                .id,
            "k01"
        );
        assert_eq!(
            only_k01.check(hdr("plain-key-value").as_ref()).unwrap_err(),
            AuthFailure::KeyNotAllowed
        );
        let none_listed = StageKeys::new(Some(plan()), Some(["k99"]));
        for v in ["mobile-app-key-0001", "plain-key-value"] {
            assert_eq!(
                none_listed.check(hdr(v).as_ref()).unwrap_err(),
                AuthFailure::KeyNotAllowed
            );
        }
        let no_plan = StageKeys::default();
        assert_eq!(
            no_plan.check(hdr("plain-key-value").as_ref()).unwrap_err(),
            AuthFailure::NoUsagePlan
        );
        assert_eq!(no_plan.check(None).unwrap_err(), AuthFailure::NoUsagePlan);
    }
}
