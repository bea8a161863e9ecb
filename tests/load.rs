//! The tracker under many clients at once: a thousand concurrent persistent connections
//! register peers, pipeline chunk registers and locations queries, and the tracker answers
//! every request and loses nothing. `make bench` runs the same generator bigger.

mod common;
#[path = "bench/load.rs"]
mod load;

use load::{Catalog, Plan};
use std::sync::Arc;
use std::time::Duration;

const CONNECTIONS: usize = 1000;

#[test]
fn a_thousand_concurrent_connections_lose_no_registration() {
    load::require_open_files(CONNECTIONS);
    let tracker = common::tracker(&[
        // Leases outlive the test, and a locations reply may list every holder for the check.
        ("SHOAL_ANNOUNCE_INTERVAL", "1m"),
        ("SHOAL_MAX_HOLDERS", "100000"),
    ]);
    let catalog = Arc::new(Catalog::new("load", 8, 256, 1 << 20));
    load::seed(tracker.addr, &catalog);
    let plan = Plan {
        label: "load",
        connections: CONNECTIONS,
        peers_per_connection: 1,
        chunk_registers: 4,
        chunks_per_register: 8,
        locations: 2,
        locations_want: Some(20),
        pipeline: 4,
        time_limit: Duration::from_secs(15),
    };

    let report = load::run(tracker.addr, &catalog, &plan);

    println!("{}", report.summary());
    let problems = load::verify(&tracker, &catalog, &[&report]);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        report.done.iter().all(|&d| d > 0),
        "every connection registered chunks within the time limit"
    );
}
