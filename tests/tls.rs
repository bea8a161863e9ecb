//! TLS on every connection, with the real binaries: a swarm over mutual TLS, refusals in the
//! handshake, a peer's certificate bound to its registration, rotation without a restart, mixed
//! modes failing fast with a clear error, and metrics over TLS.

mod common;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

fn tls_tracker(certs: &Certs) -> Proc {
    tracker(&env_refs(&certs.env("tracker")))
}

const LIST: &str = r#"{"v":1,"msg":2}"#;

#[test]
fn a_swarm_over_mutual_tls_lands_byte_identical_files() {
    let certs = Certs::new(3);
    let tracker = tls_tracker(&certs);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("s"), "model.bin", 3 << 20, 7);
    let seeder = daemon(
        tracker.addr,
        &dir.path().join("s"),
        "s",
        &env_refs(&certs.env("p0")),
    );
    let mut leechers = Vec::new();
    for i in 1..3 {
        let mut env = certs.env(&format!("p{i}"));
        env.push(("SHOAL_WANT", "model.bin".into()));
        let d = dir.path().join(format!("l{i}"));
        leechers.push((
            daemon(tracker.addr, &d, &format!("l{i}"), &env_refs(&env)),
            d,
        ));
    }
    for (leecher, d) in &leechers {
        assert_lands(&original, &d.join("model.bin"), leecher);
    }
    assert!(seeder.metric("shoal_peer_uploaded_chunks_total") > 0.0);
    assert!(
        !tracker.log_contains("TLS handshake refused"),
        "{}",
        tracker.log_text()
    );
}

#[test]
fn a_swarm_over_several_tls_trackers_lands_its_files() {
    let certs = Certs::new(2);
    let trackers = trackers(2, &env_refs(&certs.env("tracker")));
    let list = tracker_list(&trackers);
    let dir = tempfile::tempdir().unwrap();
    let original = make_file(&dir.path().join("s"), "spread.bin", 1 << 20, 9);
    let mut env = certs.env("p0");
    env.push(("SHOAL_TRACKER", list.clone()));
    let _seeder = daemon(
        trackers[0].addr,
        &dir.path().join("s"),
        "s",
        &env_refs(&env),
    );
    let mut env = certs.env("p1");
    env.push(("SHOAL_TRACKER", list));
    env.push(("SHOAL_WANT", "spread.bin".into()));
    let leecher = daemon(
        trackers[0].addr,
        &dir.path().join("l"),
        "l",
        &env_refs(&env),
    );
    assert_lands(&original, &dir.path().join("l/spread.bin"), &leecher);
    for t in &trackers {
        assert!(!t.log_contains("TLS handshake refused"), "{}", t.log_text());
    }
}

#[test]
fn clients_without_a_certificate_or_with_one_from_another_ca_are_refused_in_the_handshake() {
    let certs = Certs::new(1);
    let tracker = tls_tracker(&certs);
    let ca = certs.path("ca.pem");

    let mut anonymous = tls_client(&ca, None, tracker.addr);
    let refused = tls_ask(&mut anonymous, LIST).unwrap_err();
    assert!(refused.contains("CertificateRequired"), "{refused}");
    assert!(wait_until(Duration::from_secs(5), || tracker
        .log_contains("TLS handshake refused")
        && tracker.log_contains("showed no certificate")));

    let stranger = Certs::new(1);
    let mut foreign = tls_client(&ca, Some((&stranger, "p0")), tracker.addr);
    let refused = tls_ask(&mut foreign, LIST).unwrap_err();
    assert!(refused.contains("fatal alert"), "{refused}");
    assert!(
        wait_until(Duration::from_secs(5), || tracker
            .log_contains("invalid peer certificate")),
        "{}",
        tracker.log_text()
    );

    // A peer with a foreign certificate logs the refusal too, saying what to fix.
    let dir = tempfile::tempdir().unwrap();
    let mut env = stranger.env("p0");
    env[2].1 = ca.clone();
    let peer = daemon(tracker.addr, dir.path(), "stranger", &env_refs(&env));
    assert!(
        wait_until(Duration::from_secs(10), || peer
            .log_contains("refused this side's certificate")),
        "{}",
        peer.log_text()
    );

    let mut member = tls_client(&ca, Some((&certs, "p0")), tracker.addr);
    assert_eq!(tls_ask(&mut member, LIST).unwrap()["ok"], true);
}

#[test]
fn a_peers_chunk_server_serves_only_clients_with_a_certificate_from_the_ca() {
    let certs = Certs::new(2);
    let tracker = tls_tracker(&certs);
    let dir = tempfile::tempdir().unwrap();
    make_file(dir.path(), "a.bin", 100_000, 3);
    let seeder = daemon(tracker.addr, dir.path(), "s", &env_refs(&certs.env("p0")));
    let ca = certs.path("ca.pem");
    let request = r#"{"v":1,"msg":5,"file":"a.bin","index":0}"#;

    let mut anonymous = tls_client_for(&ca, None, seeder.addr, "shoal-peer");
    let refused = tls_ask(&mut anonymous, request).unwrap_err();
    assert!(refused.contains("CertificateRequired"), "{refused}");
    assert!(wait_until(Duration::from_secs(5), || seeder
        .log_contains("TLS handshake refused")));

    let mut member = tls_client_for(&ca, Some((&certs, "p1")), seeder.addr, "shoal-peer");
    let header = tls_ask(&mut member, request).unwrap();
    assert_eq!(header["ok"], true, "{header}");
    assert_eq!(header["length"], 65536, "{header}");
}

#[test]
fn a_tracker_whose_certificate_does_not_name_it_is_not_trusted() {
    let certs = Certs::new(1);
    // A host with a certificate from the CA, but a peer's: it names shoal-peer, not 127.0.0.1.
    let impostor = tracker(&env_refs(&certs.env("p0")));
    let out = Command::new(PEER)
        .args(["files", "--tracker", &impostor.addr.to_string()])
        .envs(env_refs(&certs.env("p0")))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not valid for name"), "{err}");
    assert!(err.contains("name the host dialled"), "{err}");
}

#[test]
fn a_peers_certificate_cannot_leave_or_report_chunks_for_another_peer() {
    let certs = Certs::new(2);
    let tracker = tls_tracker(&certs);
    let ca = certs.path("ca.pem");
    let dir = tempfile::tempdir().unwrap();
    let file = make_file(dir.path(), "f.bin", 200_000, 1);
    let offer = offer_for(&file, 65536);
    let register = serde_json::json!({
        "v": 1, "msg": 1, "name": "p0", "addr": "127.0.0.1:9", "files": [offer],
    });
    let mut p0 = tls_client(&ca, Some((&certs, "p0")), tracker.addr);
    let registered = tls_ask(&mut p0, &register.to_string()).unwrap();
    assert_eq!(registered["ok"], true, "{registered}");
    let (id, token) = (&registered["peer_id"], &registered["token"]);
    let digest = &offer["digest"];

    // p1 holds p0's token, yet its certificate is not p0's.
    let mut p1 = tls_client(&ca, Some((&certs, "p1")), tracker.addr);
    let report = serde_json::json!({
        "v": 1, "msg": 4, "peer_id": id, "token": token, "file": "f.bin", "digest": digest,
        "chunks": [0],
    });
    let leave = serde_json::json!({"v": 1, "msg": 6, "peer_id": id, "token": token});
    for request in [&report, &leave] {
        let refused = tls_ask(&mut p1, &request.to_string()).unwrap();
        assert_eq!(refused["error"], "forbidden", "{refused}");
        let why = refused["message"].as_str().unwrap();
        assert!(why.contains("certificate"), "{why}");
    }
    assert_eq!(holder_count_in(tracker.addr, "f.bin", Some(&certs)), 1);

    assert_eq!(tls_ask(&mut p0, &report.to_string()).unwrap()["ok"], true);
    assert_eq!(tls_ask(&mut p0, &leave.to_string()).unwrap()["ok"], true);
    assert_eq!(holder_count_in(tracker.addr, "f.bin", Some(&certs)), 0);
}

/// The leaf certificate a new TLS connection to `addr` is shown.
fn presented(ca: &str, certs: &Certs, addr: SocketAddr) -> Vec<u8> {
    let mut c = tls_client(ca, Some((certs, "p0")), addr);
    tls_ask(&mut c, LIST).unwrap();
    let chain = c.conn.peer_certificates().unwrap();
    chain[0].as_ref().to_vec()
}

#[test]
fn rotated_certificate_files_are_shown_to_new_connections_without_a_restart() {
    let certs = Certs::new(1);
    let tracker = tls_tracker(&certs);
    let ca = certs.path("ca.pem");
    let first = std::fs::read(certs.path("tracker.pem")).unwrap();
    let first = CertificateDer::from_pem_slice(&first).unwrap();
    assert_eq!(presented(&ca, &certs, tracker.addr), first.as_ref());

    let mut open = tls_client(&ca, Some((&certs, "p0")), tracker.addr);
    tls_ask(&mut open, LIST).unwrap();
    let second = certs.issue("tracker", &["127.0.0.1"]);
    let second = CertificateDer::from_pem_slice(second.cert.as_bytes()).unwrap();
    assert_ne!(first, second);
    assert!(
        wait_until(Duration::from_secs(10), || presented(
            &ca,
            &certs,
            tracker.addr
        ) == second.as_ref()),
        "the new certificate was never shown; log:\n{}",
        tracker.log_text()
    );
    let serial = |der: &CertificateDer| {
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        cert.raw_serial().to_vec()
    };
    assert_ne!(serial(&first), serial(&second));
    // A connection opened before the rotation carries on.
    assert_eq!(tls_ask(&mut open, LIST).unwrap()["ok"], true);
    assert!(wait_until(Duration::from_secs(5), || tracker
        .log_contains("TLS files changed on disk")));
}

#[test]
fn a_certificate_replaced_before_its_key_leaves_the_old_pair_in_force_until_the_key_follows() {
    let certs = Certs::new(1);
    let tracker = tls_tracker(&certs);
    let ca = certs.path("ca.pem");
    let first = presented(&ca, &certs, tracker.addr);
    let next = certs.ca.issue(&["127.0.0.1".to_string()]).unwrap();
    let write = |file: &str, text: &str| {
        let path = certs.dir.path().join(file);
        shoal::tls::certs::write(&path, text, 0o600).unwrap();
    };
    write("tracker.pem", &next.cert);
    // Files are looked at on each new connection: this one finds a pair that does not match.
    assert_eq!(
        presented(&ca, &certs, tracker.addr),
        first,
        "the old pair still serves"
    );
    assert!(wait_until(Duration::from_secs(5), || tracker
        .log_contains("do not make a valid set")));
    write("tracker.key", &next.key);
    let next = CertificateDer::from_pem_slice(next.cert.as_bytes()).unwrap();
    assert!(wait_until(Duration::from_secs(5), || presented(
        &ca,
        &certs,
        tracker.addr
    ) == next.as_ref()));
}

#[test]
fn a_tls_client_of_a_clear_listener_fails_at_once_with_a_clear_error() {
    let certs = Certs::new(1);
    let clear = tracker(&[]);
    let mut c = tls_client(&certs.path("ca.pem"), Some((&certs, "p0")), clear.addr);
    let failed = tls_ask(&mut c, LIST).unwrap_err();
    assert!(failed.contains("ProtocolVersion"), "{failed}");
    assert!(wait_until(Duration::from_secs(5), || clear.log_contains(
        "a TLS client connected to this clear-text listener"
    )));

    // The peer's one-shot query says what is wrong instead of waiting for a timeout.
    let out = Command::new(PEER)
        .args(["files", "--tracker", &clear.addr.to_string()])
        .envs(env_refs(&certs.env("p0")))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("clear text"), "{err}");
}

#[test]
fn a_clear_client_of_a_tls_listener_is_told_to_use_tls() {
    let certs = Certs::new(1);
    let tracker = tls_tracker(&certs);
    let reply = Raw::connect(tracker.addr).ask(LIST);
    assert_eq!(reply["error"], "bad_request", "{reply}");
    assert!(
        reply["message"].as_str().unwrap().contains("speaks TLS"),
        "{reply}"
    );
    assert!(wait_until(Duration::from_secs(5), || tracker.log_contains(
        "a clear-text client connected to this TLS listener"
    )));

    let out = Command::new(PEER)
        .args(["files", "--tracker", &tracker.addr.to_string()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("speaks TLS"), "{err}");
}

#[test]
fn a_tls_tracker_at_its_connection_limit_says_busy_in_tls() {
    let certs = Certs::new(1);
    let mut env = certs.env("tracker");
    env.push(("SHOAL_MAX_CONNECTIONS", "1".into()));
    let tracker = tracker(&env_refs(&env));
    let ca = certs.path("ca.pem");
    let mut held = tls_client(&ca, Some((&certs, "p0")), tracker.addr);
    assert_eq!(tls_ask(&mut held, LIST).unwrap()["ok"], true);
    let mut extra = tls_client(&ca, Some((&certs, "p0")), tracker.addr);
    let busy = tls_recv(&mut extra).unwrap();
    assert_eq!(busy["error"], "busy", "{busy}");
    assert_eq!(tls_ask(&mut held, LIST).unwrap()["ok"], true);
}

#[test]
fn a_client_that_says_nothing_does_not_hold_up_shutdown_in_either_mode() {
    let certs = Certs::new(1);
    for tls in [false, true] {
        let env = if tls { certs.env("tracker") } else { vec![] };
        let mut tracker = tracker(&env_refs(&env));
        let _silent = std::net::TcpStream::connect(tracker.addr).unwrap();
        // Connections are accepted in order: once a later one is answered, the silent one
        // is in the tracker's hands.
        let answered = if tls {
            let mut c = tls_client(&certs.path("ca.pem"), Some((&certs, "p0")), tracker.addr);
            tls_ask(&mut c, LIST).unwrap()
        } else {
            Raw::connect(tracker.addr).ask(LIST)
        };
        assert_eq!(answered["ok"], true);
        tracker.signal("TERM");
        let status = tracker.wait_exit(Duration::from_secs(5));
        assert!(
            status.is_some_and(|s| s.success()),
            "{}",
            tracker.log_text()
        );
    }
}

#[test]
fn gen_certs_writes_a_ca_and_certificates_a_swarm_can_use() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = Command::new(TRACKER)
        .arg("gen-certs")
        .arg(&certs)
        .args(["tracker=localhost,127.0.0.1", "p0=shoal-peer,p0"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(certs.join("p0.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "a private key is its owner's only");
    let path = |f: &str| certs.join(f).to_str().unwrap().to_string();
    let env = |stem: &str| {
        vec![
            ("SHOAL_TLS_CERT", path(&format!("{stem}.pem"))),
            ("SHOAL_TLS_KEY", path(&format!("{stem}.key"))),
            ("SHOAL_TLS_CA", path("ca.pem")),
        ]
    };
    let tracker = tracker(&env_refs(&env("tracker")));
    // The flags say the same as the variables.
    let out = Command::new(PEER)
        .args(["files", "--tracker", &tracker.addr.to_string()])
        .args(["--tls-cert", &path("p0.pem"), "--tls-key", &path("p0.key")])
        .args(["--tls-ca", &path("ca.pem")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = Command::new(TRACKER)
        .arg("gen-certs")
        .arg(&certs)
        .arg("no-names")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("STEM=NAME"));
}

#[test]
fn the_file_api_over_tls_serves_only_clients_with_a_certificate_from_the_ca() {
    let certs = Certs::new(2);
    let tracker = tls_tracker(&certs);
    let dir = tempfile::tempdir().unwrap();
    let mut env = certs.env("p0");
    env.push(("SHOAL_API_ADDR", "127.0.0.1:0".into()));
    env.push(("SHOAL_API_TLS", "true".into()));
    let peer = daemon(tracker.addr, dir.path(), "p0", &env_refs(&env));
    let api = peer.api.expect("the API is on");
    let ca = certs.path("ca.pem");
    let get = |client: &mut TlsStream| {
        let request = b"GET /v1/status HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n";
        client.write_all(request).map_err(|e| e.to_string())?;
        let mut text = String::new();
        client
            .read_to_string(&mut text)
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(text)
    };
    let mut member = tls_client_for(&ca, Some((&certs, "p1")), api, "shoal-peer");
    let status = get(&mut member).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    let mut anonymous = tls_client_for(&ca, None, api, "shoal-peer");
    let refused = get(&mut anonymous).unwrap_err();
    assert!(refused.contains("CertificateRequired"), "{refused}");
}

#[test]
fn metrics_are_served_over_tls_when_switched_on() {
    let certs = Certs::new(0);
    let mut env = certs.env("tracker");
    env.push(("SHOAL_METRICS_TLS", "1".into()));
    let tracker = tracker(&env_refs(&env));
    let mut c = tls_client(&certs.path("ca.pem"), None, tracker.metrics.unwrap());
    c.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    let _ = c.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.contains("shoal_tracker_requests_total") || text.contains("shoal_"),
        "{text}"
    );
}
