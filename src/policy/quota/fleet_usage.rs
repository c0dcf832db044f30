//! Fleet mode's usage hours (the usage API's counts), counted by each worker in memory and
//! added to Redis once a second (and when the gateway stops, and before this instance
//! answers a usage query), as report aggregates are shared: the spec's "within 2 seconds".
//!
//! Why not in the admission's script, as the window counter is: an admission then costs
//! Redis one command (`INCRBY`) instead of two, which is most of Redis's time per call
//! when a call's admissions are of many keys (10 admissions of 10 keys, `redis-benchmark`
//! and `INFO commandstats`: 20.0–23.4 µs per call with the usage `HINCRBY` in the script,
//! 11.5–16.8 µs without). The window counter, which decides admissions, stays exact and
//! atomic; usage is a count for reports. What it costs: a crash loses at most the last
//! second's usage of this instance (as in local mode), and a push whose answer is lost
//! (a timeout after Redis applied it) is sent again and counted twice.
//!
//! Shared: a worker's tally sits in its queue (`Queue::usage` in `redis.rs`), behind the
//! mutex only that worker takes on the request path; the pusher takes it once a second.

use std::sync::atomic::{AtomicU64, Ordering};

use rustc_hash::FxHashMap;

/// Adds a push's counts to the usage hours, atomically per call. KEYS: usage hours (a hash
/// of key id → count); ARGV, for each key in turn: its expiry (Unix s), the number `m` of
/// key ids that follow, then `m` pairs of key id and count. Returns the number of hours.
pub(super) const PUSH: &str = r"
local a = 1
for i = 1, #KEYS do
  local expiry = ARGV[a]
  local m = tonumber(ARGV[a + 1])
  a = a + 2
  for j = 1, m do
    redis.call('HINCRBY', KEYS[i], ARGV[a], ARGV[a + 1])
    a = a + 2
  end
  redis.call('EXPIREAT', KEYS[i], expiry)
end
return #KEYS
";

/// Counts one call of [`PUSH`] carries at most. A script blocks Redis while it runs: a
/// push of very many keys goes in several calls, between which Redis serves the
/// admissions (a few hundred `HINCRBY`s are well under a millisecond).
const PUSH_MAX: usize = 500;

/// Where one (plan, key)'s usage goes: made once, when the key is compiled, and copied
/// into a worker's tally when the key is first counted there after a push.
#[derive(Debug, Clone)]
pub(super) struct UsageName {
    /// Unique among the names this process made (a tally's key: no string hashed per
    /// admission). The same key compiled again (a reload) gets another id; its counts
    /// add up in Redis all the same.
    pub id: u64,
    /// `scpgw:usage:{plan}:` (the hour start follows).
    pub prefix: Box<str>,
    pub key_id: Box<str>,
    /// The Redis Cluster slot of the usage hours (their hash tag is the plan's).
    pub slot: u16,
}

impl UsageName {
    pub fn new(prefix: String, key_id: &str, slot: u16) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            prefix: prefix.into(),
            key_id: key_id.into(),
            slot,
        }
    }
}

/// Admissions counted and not yet pushed: (name, hour start) → count.
#[derive(Debug, Default)]
pub(super) struct Tally {
    counts: FxHashMap<(u64, i64), (UsageName, u64)>,
}

impl Tally {
    /// Counts `n` admissions of the name whose id is `id` in the hour starting at `hour`;
    /// `name` makes the name when it is new in this tally (once per key and push on a
    /// busy worker): no string is copied or hashed per admission.
    pub fn add(&mut self, id: u64, hour: i64, n: u64, name: impl FnOnce() -> UsageName) {
        self.counts
            .entry((id, hour))
            .or_insert_with(|| (name(), 0))
            .1 += n;
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Adds `other`'s counts to this tally's.
    pub fn merge(&mut self, other: Tally) {
        if self.counts.is_empty() {
            self.counts = other.counts;
            return;
        }
        for ((id, hour), (name, n)) in other.counts {
            self.add(id, hour, n, || name);
        }
    }

    /// The counts, split by the calls that carry them: one per Redis Cluster slot (`by_slot`),
    /// else one for all, and none with more than [`PUSH_MAX`] counts.
    pub fn into_calls(self, by_slot: bool) -> Vec<Tally> {
        let mut open: FxHashMap<u16, Tally> = FxHashMap::default();
        let mut full = Vec::new();
        for (k, v) in self.counts {
            let slot = if by_slot { v.0.slot } else { 0 };
            let call = open.entry(slot).or_default();
            call.counts.insert(k, v);
            if call.counts.len() == PUSH_MAX {
                full.extend(open.remove(&slot));
            }
        }
        full.extend(open.into_values());
        full
    }

    /// The call of [`PUSH`] (by its SHA-1) that adds these counts, each usage hour's
    /// expiring `retention_secs` after its hour starts.
    pub fn command(&self, sha: &str, retention_secs: i64) -> redis::Cmd {
        // Usage hour → (its key ids and counts), in a stable order.
        let mut hours: std::collections::BTreeMap<(&str, i64), Vec<(&str, u64)>> =
            std::collections::BTreeMap::new();
        for ((_, hour), (name, n)) in &self.counts {
            hours
                .entry((&name.prefix, *hour))
                .or_default()
                .push((&name.key_id, *n));
        }
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha).arg(hours.len());
        for (prefix, hour) in hours.keys() {
            cmd.arg(super::redis::with_number(prefix, *hour));
        }
        for ((_, hour), ids) in &hours {
            cmd.arg(hour + retention_secs).arg(ids.len());
            for (key_id, n) in ids {
                cmd.arg(*key_id).arg(*n);
            }
        }
        cmd
    }

    /// Each (usage hour key, key id)'s count, summed: what [`Tally::command`] adds.
    #[cfg(test)]
    pub fn totals(&self) -> std::collections::BTreeMap<(String, String), u64> {
        let mut out = std::collections::BTreeMap::new();
        for ((_, hour), (name, n)) in &self.counts {
            *out.entry((
                super::redis::with_number(&name.prefix, *hour),
                name.key_id.to_string(),
            ))
            .or_default() += n;
        }
        out
    }
}

/// [`Tally::totals`] as a test expects it: (usage hour key, key id, count) rows.
#[cfg(test)]
pub fn totals(rows: &[(&str, &str, u64)]) -> std::collections::BTreeMap<(String, String), u64> {
    rows.iter()
        .map(|(k, id, n)| ((k.to_string(), id.to_string()), *n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &redis::Cmd) -> Vec<String> {
        cmd.args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => String::from_utf8_lossy(b).into_owned(),
                redis::Arg::Cursor => panic!("no cursor"),
            })
            .collect()
    }

    /// Counts add up per (name, hour); a key compiled twice (a reload) is counted under
    /// two names and pushed to the same field, so Redis adds both.
    #[test]
    fn a_push_carries_each_hours_counts() {
        let a = UsageName::new("scpgw:usage:{p}:".into(), "a", 7);
        let b = UsageName::new("scpgw:usage:{p}:".into(), "b", 7);
        let a_again = UsageName::new("scpgw:usage:{p}:".into(), "a", 7);
        let add =
            |t: &mut Tally, name: &UsageName, hour, n| t.add(name.id, hour, n, || name.clone());
        let mut t = Tally::default();
        assert!(t.is_empty());
        add(&mut t, &a, 0, 1);
        add(&mut t, &a, 0, 2);
        add(&mut t, &b, 0, 1);
        add(&mut t, &a, 3600, 1);
        let mut other = Tally::default();
        add(&mut other, &a_again, 0, 4);
        add(&mut other, &b, 0, 1);
        t.merge(other);
        let want = totals(&[
            ("scpgw:usage:{p}:0", "a", 7),
            ("scpgw:usage:{p}:0", "b", 2),
            ("scpgw:usage:{p}:3600", "a", 1),
        ]);
        assert_eq!(t.totals(), want);
        let cmd = t.command("sha", 100);
        let got = args(&cmd);
        assert_eq!(
            got[..5],
            [
                "EVALSHA",
                "sha",
                "2",
                "scpgw:usage:{p}:0",
                "scpgw:usage:{p}:3600"
            ]
        );
        // The first hour: its expiry, three entries (`a` twice, under two names), pairs.
        assert_eq!(got[5..7], ["100", "3"]);
        let mut pairs: Vec<(&str, &str)> = got[7..13]
            .chunks(2)
            .map(|p| (p[0].as_str(), p[1].as_str()))
            .collect();
        pairs.sort_unstable();
        assert_eq!(pairs, [("a", "3"), ("a", "4"), ("b", "2")]);
        assert_eq!(got[13..], ["3700", "1", "a", "1"]);
    }

    /// In a Redis Cluster a call's keys must share a slot: one call per slot; a standalone
    /// Redis takes everything in one call.
    #[test]
    fn a_cluster_push_is_one_call_per_slot() {
        let p = UsageName::new("scpgw:usage:{p}:".into(), "a", 1);
        let q = UsageName::new("scpgw:usage:{q}:".into(), "a", 2);
        let mut t = Tally::default();
        for (name, hour) in [(&p, 0), (&q, 0), (&q, 3600)] {
            t.add(name.id, hour, 1, || name.clone());
        }
        let one = Tally {
            counts: t.counts.clone(),
        };
        assert_eq!(one.into_calls(false).len(), 1);
        let mut calls = t.into_calls(true);
        calls.sort_by_key(|c| c.counts.len());
        // More than a call carries: several calls, every count in one of them.
        let mut many = Tally::default();
        for i in 0..(2 * PUSH_MAX as u64 + 1) {
            let name = UsageName::new("scpgw:usage:{p}:".into(), &format!("k{i}"), 1);
            many.add(name.id, 0, 1, || name.clone());
        }
        let sizes: Vec<usize> = many
            .into_calls(false)
            .iter()
            .map(|c| c.counts.len())
            .collect();
        assert_eq!(sizes.len(), 3, "{sizes:?}");
        assert!(sizes.iter().all(|n| *n <= PUSH_MAX), "{sizes:?}");
        assert_eq!(sizes.iter().sum::<usize>(), 2 * PUSH_MAX + 1);
        assert_eq!(
            calls.iter().map(|c| c.counts.len()).collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(calls.iter().all(|c| c
            .counts
            .values()
            .all(|(n, _)| n.slot == c.counts.values().next().unwrap().0.slot)));
    }
}
