//! The `silt` binary: parse the command line, start the runtime and logging, run the command
//! (cli/), and turn its outcome into an exit code: 0 ok, 1 data tests failed or findings, 2
//! usage or config, 3 runtime or storage. It must stay thin: no pipeline logic, SQL or policy.

mod cli;

use std::process::ExitCode;

use cli::ExitWith;

fn main() -> ExitCode {
    // SIGPIPE stays ignored (Rust's default): gRPC and HTTP clients write to sockets with
    // writev, and a peer that closed one must be an error, not a silent death of a cluster node
    // or a client. Output to a reader that went away (`silt … | head`) is dropped quietly by
    // `cli::printers::write_stdout`.
    let cli = cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(cli::log_filter(&cli))
        .with_writer(std::io::stderr)
        .init();
    // At least two workers, so the lease's renewal runs beside a busy one on a 1-core machine.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get().max(2));
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(3);
        }
    };
    match rt.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit_code(&e),
    }
}

/// Print an error on stderr (unless the command printed its own report) and choose the code.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    if let Some(ExitWith(code)) = e.downcast_ref::<ExitWith>() {
        return ExitCode::from(*code);
    }
    let silt_error = e.downcast_ref::<silt::Error>();
    eprintln!("error: {}", describe(e));
    if let Some(h) = silt_error.and_then(|e| e.hint()) {
        eprintln!("  {h}");
    }
    let code = silt_error.map(|e| e.exit_code()).unwrap_or(3);
    ExitCode::from(code as u8)
}

/// An error and the causes its text does not already say, each once (a library error's text
/// usually includes its source's, and anyhow's `{:#}` would repeat it).
fn describe(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}
