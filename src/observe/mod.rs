//! Observation: what the gateway records about the requests it serves.
//!
//! - `series`: what requests write, per worker (counters, histograms, report deltas);
//! - `metrics`: the Prometheus exposition of the series and of control-plane metrics;
//! - `report`: report aggregates (merged from the series, persisted, shared with a fleet);
//! - `usage`: the usage API's per-day answer from quota usage;
//! - `access_log`: one JSON line per request, written by its own thread;
//! - `trace`: OpenTelemetry spans, exported over OTLP by their own thread.

pub mod access_log;
pub mod metrics;
pub mod report;
pub mod series;
pub mod trace;
pub mod usage;
