//! `scp-gateway` binary: see `scp_gateway::cli` for the commands.

/// mimalloc instead of glibc's allocator: the request path allocates and frees a few dozen
/// small blocks per request (hyper's messages, header maps, futures); measured with
/// callgrind in `benches/results/`.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    scp_gateway::cli::main()
}
