//! Where a swarm's processes run: all on 127.0.0.1 (caps set by each program's own limiter), or
//! each peer in its own network namespace, joined by a veth pair to a bridge in a hub namespace
//! (where the tracker runs), with every link's rate enforced by the kernel (`tc` `tbf`).
//!
//! Namespaces are named `shoalbench-<pid>-<role>`, so two runs never collide; they are deleted
//! when the [`Fabric`] is dropped, on SIGINT/SIGTERM, and (left by a run that was killed
//! outright) at the start of the next run.

use anyhow::{bail, Context};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

const PREFIX: &str = "shoalbench-";
/// Namespaces made by this run and not yet deleted, for the signal handler.
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// One process of a swarm: the hub (tracker) or peer `i` (0 is the seeder).
#[derive(Clone, Copy, Debug)]
pub enum Spot {
    Hub,
    Peer(usize),
}

/// Where a swarm runs.
pub enum Place {
    Loopback,
    Kernel(Fabric),
}

impl Place {
    /// `program` set to run at `spot` (`ip netns exec` keeps the environment and the pid).
    pub fn command(&self, spot: Spot, program: &str) -> Command {
        match self {
            Place::Loopback => Command::new(program),
            Place::Kernel(fabric) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &fabric.namespace(spot), program]);
                cmd
            }
        }
    }

    /// The address the process at `spot` listens on.
    pub fn ip(&self, spot: Spot) -> IpAddr {
        match self {
            Place::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Place::Kernel(_) => IpAddr::V4(fabric_ip(spot)),
        }
    }

    /// Runs `f` where it can reach the process at `spot` (its 127.0.0.1 included).
    pub fn run<R: Send>(&self, spot: Spot, f: impl FnOnce() -> R + Send) -> R {
        match self {
            Place::Loopback => f(),
            Place::Kernel(fabric) => fabric.run(spot, f).expect("enter the namespace"),
        }
    }
}

/// 10.77.0.1 for the hub, 10.77.x.y from .2 on for the peers.
fn fabric_ip(spot: Spot) -> Ipv4Addr {
    let host = match spot {
        Spot::Hub => 1,
        Spot::Peer(i) => i as u32 + 2,
    };
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 77, 0, 0)) + host)
}

/// Per-link rates of a [`Fabric`], bytes per second.
pub struct Links {
    /// Each peer's upload (its egress towards the bridge), peer 0 first.
    pub upload: Vec<u64>,
    /// Every peer's download (the bridge's egress towards it), when capped.
    pub download: Option<u64>,
}

/// The namespaces, bridge and veth links of one swarm; deleted when dropped.
pub struct Fabric {
    run_tag: String,
    peers: usize,
}

/// Why namespaces cannot be made here, or `None` if they can.
pub fn unavailable() -> Option<String> {
    if !crate::is_root() {
        return Some("network namespaces need root".into());
    }
    for tool in ["ip", "tc"] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("`{tool}` (iproute2) is not installed"));
        }
    }
    probe().err().map(|e| format!("{e:#}"))
}

/// Makes what a [`Fabric`] needs once, in a namespace of its own (a container may refuse
/// namespaces, bridges, veth pairs or `tbf`), and deletes it.
fn probe() -> anyhow::Result<()> {
    install_cleanup();
    let ns = format!("{PREFIX}{}-probe", std::process::id());
    ip(&["netns", "add", &ns]).context("cannot make a network namespace")?;
    LIVE.lock().unwrap().push(ns.clone());
    let made = ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])
        .and_then(|()| {
            ip(&[
                "-n", &ns, "link", "add", "probe0", "type", "veth", "peer", "name", "probe1",
            ])
        })
        .and_then(|()| shape(&ns, "probe0", MIB_PER_SEC));
    delete_namespace(&ns);
    LIVE.lock().unwrap().retain(|n| *n != ns);
    made
}

/// The rate [`probe`] shapes a link to.
const MIB_PER_SEC: u64 = 1 << 20;

impl Fabric {
    /// A hub namespace with a bridge and one namespace per peer, each linked to the bridge with
    /// its rates capped by `tbf`.
    pub fn new(links: &Links) -> anyhow::Result<Fabric> {
        install_cleanup();
        let fabric = Fabric {
            run_tag: format!("{PREFIX}{}", std::process::id()),
            peers: links.upload.len(),
        };
        let hub = fabric.namespace(Spot::Hub);
        fabric.add_namespace(&hub)?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &hub,
            "addr",
            "add",
            &format!("{}/16", fabric_ip(Spot::Hub)),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for (i, &upload) in links.upload.iter().enumerate() {
            let ns = fabric.namespace(Spot::Peer(i));
            fabric.add_namespace(&ns)?;
            let port = format!("v{i}");
            ip(&[
                "-n", &hub, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &hub, "link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("{}/16", fabric_ip(Spot::Peer(i)));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            shape(&ns, "eth0", upload)?;
            if let Some(download) = links.download {
                shape(&hub, &port, download)?;
            }
        }
        Ok(fabric)
    }

    pub fn namespace(&self, spot: Spot) -> String {
        match spot {
            Spot::Hub => format!("{}-hub", self.run_tag),
            Spot::Peer(i) => format!("{}-{i}", self.run_tag),
        }
    }

    fn add_namespace(&self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        LIVE.lock().unwrap().push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    /// Runs `f` on a thread that entered `spot`'s namespace.
    fn run<R: Send>(&self, spot: Spot, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
        let path = format!("/run/netns/{}", self.namespace(spot));
        let ns = std::fs::File::open(&path).with_context(|| format!("cannot open {path}"))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: a valid namespace descriptor; setns moves only this thread, which
                // ends with the scope.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!("setns {path}: {}", std::io::Error::last_os_error());
                }
                Ok(f())
            })
            .join()
            .expect("namespace thread")
        })
    }

    /// Sends from peer `i` to the hub (`upload`) or back for `seconds` over one TCP
    /// connection, as fast as the link lets it; returns the received rate, bytes per second.
    pub fn measure(&self, i: usize, upload: bool, seconds: f64) -> anyhow::Result<f64> {
        let (sender, receiver) = if upload {
            (Spot::Peer(i), Spot::Hub)
        } else {
            (Spot::Hub, Spot::Peer(i))
        };
        let listener = self.run(receiver, || TcpListener::bind((fabric_ip(receiver), 0)))??;
        let to: SocketAddr = listener.local_addr()?;
        std::thread::scope(|s| {
            let send = s.spawn(|| {
                self.run(sender, || -> std::io::Result<()> {
                    let mut stream = TcpStream::connect(to)?;
                    let block = vec![7u8; 64 * 1024];
                    let end = Instant::now() + Duration::from_secs_f64(seconds);
                    while Instant::now() < end {
                        stream.write_all(&block)?;
                    }
                    Ok(())
                })
            });
            let (mut stream, _) = listener.accept()?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut first = None;
            let mut received = 0u64;
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                // The first segment starts the clock; its bytes were sent before it.
                if first.is_none() {
                    first = Some(Instant::now());
                } else {
                    received += n as u64;
                }
            }
            send.join().expect("sender")??;
            let elapsed = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
            if elapsed <= 0.0 {
                bail!("nothing arrived over the link of peer {i}");
            }
            Ok(received as f64 / elapsed)
        })
    }
}

impl Drop for Fabric {
    fn drop(&mut self) {
        let names: Vec<String> = (0..self.peers)
            .map(|i| self.namespace(Spot::Peer(i)))
            .chain([self.namespace(Spot::Hub)])
            .collect();
        for name in &names {
            delete_namespace(name);
        }
        LIVE.lock().unwrap().retain(|n| !names.contains(n));
    }
}

/// `tbf` on `dev`'s egress in namespace `ns` at `rate` bytes per second. The burst holds a
/// whole 64 KiB segment (veth passes GSO segments that large) and the queue 100 ms.
fn shape(ns: &str, dev: &str, rate: u64) -> anyhow::Result<()> {
    let rate_arg = format!("{rate}bps");
    let burst = (rate / 50).max(128 * 1024).to_string();
    let status = Command::new("tc")
        .args([
            "-n", ns, "qdisc", "add", "dev", dev, "root", "tbf", "rate", &rate_arg,
        ])
        .args(["burst", &burst, "latency", "100ms"])
        .output()
        .context("cannot run tc")?;
    if !status.status.success() {
        bail!(
            "tc on {dev} in {ns}: {}",
            String::from_utf8_lossy(&status.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Kills whatever still runs in namespace `name`, then deletes it (its veth ends go with it).
fn delete_namespace(name: &str) {
    let pids = Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: kill has no memory preconditions; the pid is one listed in our namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = Command::new("ip")
        .args(["netns", "delete", name])
        .stderr(Stdio::null())
        .status();
}

/// Once per run: delete namespaces left by runs that no longer exist, and delete this run's
/// on SIGINT/SIGTERM before exiting.
fn install_cleanup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let listed = Command::new("ip")
            .args(["netns", "list"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for name in listed.lines().filter_map(|l| l.split_whitespace().next()) {
            let owner = name
                .strip_prefix(PREFIX)
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok());
            if owner.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists()) {
                println!("  deleting namespace {name}, left by an interrupted run");
                delete_namespace(name);
            }
        }
        let handler = ctrlc::set_handler(|| {
            // A panic elsewhere may have poisoned the list; its names are still right.
            for name in LIVE.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
                delete_namespace(&name);
            }
            std::process::exit(130);
        });
        if let Err(e) = handler {
            eprintln!("no cleanup on interruption: {e}");
        }
    });
}
