//! `scp-gateway` binary: see `scp_gateway::cli` for the commands.
//!
//! The system allocator is kept on purpose: mimalloc was measured (2026-11-22) at 1–3% more
//! requests/s, within noise, but 43% more resident memory and a slower start with 1,000
//! APIs × 300 resources loaded (1.23 GB and 2.3–3.7 s against 0.86 GB and 1.6 s).
//!
//! jemalloc (`tikv-jemallocator` 0.6) was measured on 2026-12-02 with the load bench's
//! instruction counts, the floor given jemalloc too. Per request it saved ~280 instructions
//! in the bare route and ~400 in the full chain (1%), and 1,000–1,700 in fleet mode (2–4%).
//! The floor gained about as much, so the ratios to the floor stayed the same (bare 1.34×,
//! or 1.38× with 16 connections at once). glibc's per-thread cache keeps 7 free blocks of a
//! size, and a loaded worker has more requests than that in flight; jemalloc's cache also
//! fills and flushes under its lock at this size (~1 KB). With 1,000 APIs loaded it used
//! 412 MB in 1.23 s, against glibc's 428 MB in 1.33 s. Each idle connection took 21.1 KiB,
//! against 20.0 with glibc. A C dependency for a 1–4% saving was not taken. mimalloc
//! (0.1.52), measured the same day in the same way: no change with one connection, ~850
//! fewer instructions per request in the bare route and the full chain with 16 connections
//! at once (the floor unchanged), but 28.9 KiB per idle connection against 20.0, and 1,000
//! APIs in 478 MB and 2.27 s against 428 MB and 1.33 s.
//!
//! What glibc costs under load is its per-thread cache's limit of 7 free blocks per size:
//! a worker with more requests in flight takes the slow path for the request's two boxes
//! (~1 KB each, see `pipeline::handle`). `GLIBC_TUNABLES=glibc.malloc.tcache_count=64` in
//! the gateway's environment lifts it (docs/operations.md).

fn main() -> std::process::ExitCode {
    scp_gateway::cli::main()
}
