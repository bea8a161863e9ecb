//! A small HTTP origin for trying pull-through and for the container end-to-end run:
//! `origin <dir> <listen-addr>` serves the files under `dir` with ranges, ETag and
//! Last-Modified, and reports what it sent at `GET /-/stats`. The serving code is the test
//! harness's (tests/common/origin.rs), so both speak exactly the same HTTP.

#[path = "../tests/common/origin.rs"]
#[allow(dead_code)] // the test-only wrapper and fault switches
mod origin;

use std::sync::Arc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, addr] = args.as_slice() else {
        eprintln!("usage: origin <dir> <listen-addr>   (e.g. origin /data 0.0.0.0:8080)");
        return std::process::ExitCode::from(2);
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("origin: cannot listen on {addr}: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let shown = listener
        .local_addr()
        .map_or(addr.clone(), |a| a.to_string());
    eprintln!("origin: serving {dir} on http://{shown}");
    origin::serve(
        listener,
        Arc::new(origin::Origin::new(std::path::Path::new(dir))),
    )
    .await;
    std::process::ExitCode::SUCCESS
}
