//! Real container runtimes pulling through agents: containerd (`ctr`, a private instance in a
//! temporary directory) with the hosts.toml that `shoal-peer mirror-config` writes, and the
//! files `mirror-config` manages.

mod common;

use common::registry::{build_image, tools_present, Image, Registry};
use common::{daemon, tracker, wait_until, Proc, PEER};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

fn mirror_config(hosts_dir: &Path, args: &[&str]) -> Output {
    Command::new(PEER)
        .arg("mirror-config")
        .arg("--hosts-dir")
        .arg(hosts_dir)
        .args(args)
        .env_remove("SHOAL_REGISTRY_UPSTREAM")
        .output()
        .unwrap()
}

fn read(path: PathBuf) -> String {
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn mirror_config_writes_a_hosts_toml_per_upstream_and_removes_its_stale_ones() {
    let dir = tempfile::tempdir().unwrap();
    let agent = ["--agent", "http://10.0.0.5:7480"];
    let both = "docker.io=http://127.0.0.1:5000,http://10.0.0.9:5000";
    let out = mirror_config(
        dir.path(),
        &[&agent[..], &["--registry-upstream", both]].concat(),
    );
    assert!(out.status.success(), "{out:?}");

    let docker = read(dir.path().join("docker.io/hosts.toml"));
    assert!(
        docker.contains("server = \"https://registry-1.docker.io\""),
        "{docker}"
    );
    assert!(docker.contains("[host.\"http://10.0.0.5:7480\"]\n  capabilities = [\"pull\"]"));
    let local = read(dir.path().join("10.0.0.9:5000/hosts.toml"));
    assert!(
        local.contains("server = \"http://10.0.0.9:5000\""),
        "{local}"
    );

    // The operator's own file for another registry is not ours to remove.
    let own = dir.path().join("ghcr.io/hosts.toml");
    std::fs::create_dir_all(own.parent().unwrap()).unwrap();
    std::fs::write(&own, "server = \"https://ghcr.io\"\n").unwrap();
    let out = Command::new(PEER)
        .args(["mirror-config", "--resolve", "--hosts-dir"])
        .arg(dir.path())
        .args(agent)
        .env("SHOAL_REGISTRY_UPSTREAM", "http://10.0.0.9:5000")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!dir.path().join("docker.io").exists());
    let local = read(dir.path().join("10.0.0.9:5000/hosts.toml"));
    assert!(
        local.contains(r#"capabilities = ["pull", "resolve"]"#),
        "{local}"
    );
    assert_eq!(read(own.clone()), "server = \"https://ghcr.io\"\n");

    let out = mirror_config(dir.path(), &agent);
    assert!(out.status.success(), "{out:?}");
    assert!(!dir.path().join("10.0.0.9:5000").exists());
    assert!(own.exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("ghcr.io"))
        .unwrap()
        .collect();
    assert_eq!(leftovers.len(), 1, "no temporary file is left behind");
}

#[test]
fn mirror_config_leaves_a_hosts_toml_it_did_not_write_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("docker.io/hosts.toml");
    std::fs::create_dir_all(own.parent().unwrap()).unwrap();
    std::fs::write(&own, "server = \"https://registry-1.docker.io\"\n").unwrap();
    let upstreams = "docker.io=http://127.0.0.1:5000,http://10.0.0.9:5000";
    let args = [
        "--agent",
        "http://10.0.0.5:7480",
        "--registry-upstream",
        upstreams,
    ];
    let out = mirror_config(dir.path(), &args);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("docker.io/hosts.toml exists and was not written by"),
        "{err}"
    );
    assert_eq!(read(own), "server = \"https://registry-1.docker.io\"\n");
    assert!(dir.path().join("10.0.0.9:5000/hosts.toml").exists());
}

#[test]
fn mirror_config_refuses_bad_flags_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    for (args, says) in [
        (
            [
                "--agent",
                "10.0.0.5:7480",
                "--registry-upstream",
                "http://r:5000",
            ],
            "--agent",
        ),
        (
            ["--agent", "http://a:7480", "--registry-upstream", "r:5000"],
            "SHOAL_REGISTRY_UPSTREAM",
        ),
    ] {
        let out = mirror_config(dir.path(), &args);
        assert_eq!(out.status.code(), Some(2), "{out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{out:?}"
        );
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// A private containerd (root, state and socket in a temporary directory, no CRI); killed when
/// dropped. Needs root.
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/containerd.sock\"\n\
             [ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n"
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.path().join("config.toml"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("containerd.log")).unwrap())
            .spawn()
            .expect("containerd starts");
        let containerd = Containerd { child, dir };
        let up = wait_until(Duration::from_secs(20), || {
            containerd.ctr(&["version"]).status.success()
        });
        assert!(up, "containerd did not start:\n{}", containerd.log());
        containerd
    }

    /// `ctr --address SOCKET ARGS`, killed after 120 s.
    fn ctr(&self, args: &[&str]) -> Output {
        let socket = self.dir.path().join("containerd.sock");
        Command::new("timeout")
            .args(["--kill-after=5", "120", "ctr", "--address"])
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("timeout and ctr run")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Fetches every blob of `reference` (no unpacking, so no mounts) with the registry hosts
    /// configured in `hosts_dir`.
    fn fetch(&self, hosts_dir: &Path, reference: &str) {
        let hosts = hosts_dir.to_str().unwrap();
        let out = self.ctr(&["content", "fetch", "--hosts-dir", hosts, reference]);
        assert!(
            out.status.success(),
            "ctr content fetch failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// The digests of the content store, each checked against its bytes by containerd.
    fn content(&self) -> String {
        String::from_utf8_lossy(&self.ctr(&["content", "ls", "--quiet"]).stdout).into_owned()
    }

    /// The manifest digest the image `reference` points at.
    fn image_target(&self, reference: &str) -> Option<String> {
        let out = self.ctr(&["images", "ls"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{reference} ")))?;
        line.split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .map(str::to_string)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this test can run containerd: it needs root and the binaries; outside CI a missing
/// one skips it with a printed reason.
fn containerd_usable() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the containerd test as root"
        );
        eprintln!("not root: skipping the containerd test");
        return false;
    }
    tools_present(&[("containerd", "containerd"), ("ctr", "containerd")])
}

/// A node agent mirroring `upstream`, its API on an ephemeral port.
fn agent(tracker: SocketAddr, dir: &Path, name: &str, upstream: &str) -> Proc {
    let env = [
        ("SHOAL_API_ADDR", "127.0.0.1:0"),
        ("SHOAL_REGISTRY_UPSTREAM", upstream),
    ];
    daemon(tracker, dir, name, &env)
}

/// Writes the hosts.toml pointing the registry at `agent` under a new directory in `dir`.
fn hosts_dir_for(dir: &Path, agent: &Proc, upstream: &str) -> PathBuf {
    let hosts = dir.join(format!("hosts-{}", agent.api.unwrap().port()));
    let url = format!("http://{}", agent.api.unwrap());
    let out = mirror_config(&hosts, &["--agent", &url, "--registry-upstream", upstream]);
    assert!(out.status.success(), "{out:?}");
    hosts
}

/// How many peers the tracker lists with every chunk of `name`.
fn seeders(tracker: SocketAddr, name: &str) -> u64 {
    let out = Command::new(PEER)
        .args(["files", "--json", "--tracker", &tracker.to_string()])
        .output()
        .unwrap();
    let files: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let file = files.iter().find(|f| f["name"] == name);
    file.and_then(|f| f["seeders"].as_u64()).unwrap_or(0)
}

fn assert_fetched_whole(containerd: &Containerd, reference: &str, image: &Image) {
    let target = containerd.image_target(reference);
    assert_eq!(target.as_deref(), Some(image.manifest.digest.as_str()));
    let content = containerd.content();
    for blob in image.blobs() {
        assert!(
            content.contains(&blob.digest),
            "{} missing:\n{content}",
            blob.digest
        );
    }
}

#[test]
fn containerd_pulls_through_two_agents_and_upstream_sends_each_layer_once() {
    if !containerd_usable() {
        return;
    }
    let Some(registry) = Registry::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let image = build_image(&dir.path().join("image"), &[400 << 10, 1 << 20, 3 << 20], 7);
    registry.push(&dir.path().join("image"), "team/app", "v1");
    let reference = format!("{}/team/app:v1", registry.host());

    let tracker = tracker(&[]);
    let upstream = registry.url();
    let first = agent(tracker.addr, &dir.path().join("a"), "a", &upstream);
    let second = agent(tracker.addr, &dir.path().join("b"), "b", &upstream);

    let node_a = Containerd::start();
    node_a.fetch(&hosts_dir_for(dir.path(), &first, &upstream), &reference);
    assert_fetched_whole(&node_a, &reference, &image);
    let served = first.metric(r#"shoal_peer_mirror_requests_total{kind="blob",status="200"}"#);
    assert!(
        served >= image.blobs().len() as f64,
        "containerd asked the agent"
    );

    // The second node's agent finds every chunk of the layers at the first.
    for blob in image.blobs() {
        let name = format!("oci/{}", blob.digest.replace(':', "/"));
        let whole = wait_until(Duration::from_secs(20), || {
            seeders(tracker.addr, &name) >= 1
        });
        assert!(whole, "{name} never listed whole:\n{}", first.log_text());
    }
    let node_b = Containerd::start();
    node_b.fetch(&hosts_dir_for(dir.path(), &second, &upstream), &reference);
    assert_fetched_whole(&node_b, &reference, &image);
    assert!(second.metric(r#"shoal_peer_mirror_bytes_total{source="peers"}"#) > 0.0);

    let logged = wait_until(Duration::from_secs(10), || {
        let last = image.layers.last().unwrap();
        registry.blob_served(&last.digest).bytes >= last.size
    });
    assert!(logged, "{:?}", registry.accesses());
    for blob in image.blobs() {
        let served = registry.blob_served(&blob.digest);
        assert_eq!(
            served.bytes, blob.size,
            "upstream sent {} once",
            blob.digest
        );
    }
}
