//! Configuration as an operator meets it, through the real binaries: typos and unknown keys stop
//! the program naming the nearest setting, byte sizes take units, a tracker host alone means port
//! 7400, each command's help lists what it uses, and completions and man pages are generated.

mod common;
use common::*;
use serde_json::Value;
use std::process::{Command, Output, Stdio};

/// Runs a binary to completion with `env` added to a clean `SHOAL_*` environment.
fn run(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(binary);
    for (key, _) in std::env::vars().filter(|(k, _)| k.starts_with("SHOAL_")) {
        cmd.env_remove(key);
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `config` object of a binary's JSON start-up line.
fn start_config(out: &Output) -> Value {
    let text = stderr(out);
    let start = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("starting"))
        })
        .unwrap_or_else(|| panic!("no start-up line in:\n{text}"));
    assert!(start["config"].is_object(), "{start}");
    start["config"].clone()
}

#[test]
fn a_misspelt_variable_stops_either_program_with_a_suggestion() {
    let out = run(PEER, &["files"], &[("SHOAL_TRAKER", "127.0.0.1:9")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("SHOAL_TRAKER: did you mean SHOAL_TRACKER?"),
        "{}",
        stderr(&out)
    );
    let out = run(
        TRACKER,
        &["--listen", "127.0.0.1:0"],
        &[("SHOAL_LISTN", "x")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("did you mean SHOAL_LISTEN?"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unknown_settings_file_key_stops_the_program_with_a_suggestion() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tracker.toml");
    std::fs::write(&file, "max_holder = 3\n").unwrap();
    let path = file.to_str().unwrap();
    for out in [
        run(TRACKER, &["--config", path], &[]),
        run(TRACKER, &[], &[("SHOAL_CONFIG", path)]),
    ] {
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("max_holder in")
                && stderr(&out).contains("did you mean max_holders?"),
            "{}",
            stderr(&out)
        );
    }
}

#[test]
fn bad_values_name_their_key_without_rust_types() {
    let out = run(
        TRACKER,
        &["--log-format", "json"],
        &[("SHOAL_MAX_PEERS", "0")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("SHOAL_MAX_PEERS must be at least 1 peer"),
        "{}",
        stderr(&out)
    );
    let out = run(TRACKER, &[], &[("SHOAL_LOG_FORMAT", "yaml")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("SHOAL_LOG_FORMAT: \"yaml\" is not a log format: use text or json"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn byte_settings_accept_units() {
    let units = [("SHOAL_CHUNK_SIZE", "64KiB"), ("SHOAL_UPLOAD_LIMIT", "10M")];
    let (tracker, _seeder, _dir, _) = seeded("a.bin", 200_000, 41, &units);
    let loc = locations(tracker.addr, "a.bin");
    assert_eq!(loc["file"]["chunk_size"], 65536, "{loc}");
}

#[test]
fn the_start_line_shows_units_and_the_default_tracker_port() {
    // The command fails to reach a tracker (or finds one); either way it logs its settings first.
    let out = run(
        PEER,
        &[
            "files",
            "--tracker",
            "localhost",
            "--log",
            "info",
            "--log-format",
            "json",
        ],
        &[
            ("SHOAL_UPLOAD_LIMIT", "1GiB"),
            ("SHOAL_CONNECT_TIMEOUT", "1s"),
        ],
    );
    let config = start_config(&out);
    assert_eq!(config["tracker"], "localhost:7400", "{config}");
    assert_eq!(config["upload_limit"], 1u64 << 30, "{config}");
}

#[test]
fn the_seed_form_says_when_a_port_is_out_of_range() {
    let out = run(PEER, &["99999", "0", "me"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("99999 is not a port number"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("subcommand"), "{}", stderr(&out));
}

#[test]
fn each_command_help_lists_only_the_flags_it_uses() {
    let help = |args: &[&str]| stdout(&run(PEER, args, &[]));
    let files = help(&["files", "--help"]);
    assert!(
        files.contains("--tracker") && files.contains("--config"),
        "{files}"
    );
    for unused in ["--listen", "--want", "--data-dir", "--chunk-size"] {
        assert!(
            !files.contains(unused),
            "files --help lists {unused}:\n{files}"
        );
    }
    let run_help = help(&["run", "--help"]);
    for used in [
        "--want",
        "--data-dir",
        "--chunk-size",
        "--log-format",
        "--metrics-addr",
    ] {
        assert!(
            run_help.contains(used),
            "run --help lacks {used}:\n{run_help}"
        );
    }
    let seed = help(&["7400", "0", "me", "--help"]);
    assert!(
        seed.contains("<LISTEN_PORT>") && !seed.contains("--listen") && !seed.contains("--tracker"),
        "the seed form's positionals replace those flags:\n{seed}"
    );
    let health = help(&["health", "--help"]);
    assert!(
        health.contains("--metrics-addr") && !health.contains("--tracker"),
        "{health}"
    );
    let tracker = stdout(&run(TRACKER, &["--help"], &[]));
    assert!(
        tracker.contains("--config") && tracker.contains("--log"),
        "{tracker}"
    );
}

#[test]
fn version_comes_from_the_package() {
    for binary in [PEER, TRACKER] {
        let out = run(binary, &["--version"], &[]);
        assert!(out.status.success());
        assert!(
            stdout(&out).trim().ends_with(env!("CARGO_PKG_VERSION")),
            "{}",
            stdout(&out)
        );
    }
}

#[test]
fn completions_and_man_pages_are_generated() {
    let out = run(PEER, &["completions", "bash"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let script = stdout(&out);
    assert!(
        script.contains("complete -F") && script.contains("shoal-peer"),
        "{script}"
    );
    assert!(
        script.contains("locate"),
        "subcommands are completed:\n{script}"
    );
    let out = run(TRACKER, &["completions", "zsh"], &[]);
    assert!(out.status.success() && stdout(&out).contains("#compdef shoal-tracker"));
    for binary in [PEER, TRACKER] {
        let out = run(binary, &["man"], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains(".TH shoal-"), "{}", stdout(&out));
    }
}
