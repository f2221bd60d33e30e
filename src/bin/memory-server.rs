//! The `memory-server` daemon (its code lives in the `remote-mem-server` crate).

fn main() -> std::process::ExitCode {
    remote_mem_server::run_cli()
}
