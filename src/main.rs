//! `scp-gateway` binary: see `scp_gateway::cli` for the commands.

fn main() -> std::process::ExitCode {
    scp_gateway::cli::main()
}
