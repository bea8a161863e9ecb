//! What a benchmark run produces: a table per scenario on stdout, `target/bench/<scenario>.json`,
//! and, after a full run of every scenario, the generated part of `docs/BENCHMARKS.md` (between
//! its two markers; the hand-written sections around them are kept).

use crate::Scale;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// One scenario's results.
pub struct Outcome {
    /// File name of its JSON, e.g. `swarm`.
    pub name: &'static str,
    pub title: &'static str,
    /// The settings that matter for reading the numbers.
    pub settings: Vec<String>,
    pub table: Table,
    pub goals: Vec<Goal>,
    /// Everything measured, for `target/bench/<name>.json`.
    pub data: Value,
}

pub struct Table {
    pub head: Vec<&'static str>,
    pub rows: Vec<Vec<String>>,
}

pub struct Goal {
    pub text: String,
    pub met: bool,
}

impl Goal {
    pub fn new(text: impl Into<String>, met: bool) -> Goal {
        Goal {
            text: text.into(),
            met,
        }
    }
}

/// A scenario that could not be measured: which, and why (a corrupted copy, a lost
/// registration, a process that would not start).
pub struct Failure {
    pub name: &'static str,
    pub why: String,
}

/// The machine and the source, as the report describes them.
pub struct Setup {
    pub cores: usize,
    pub model: String,
    pub memory_gib: f64,
    /// `git describe --always --dirty` of the source measured.
    pub revision: String,
}

impl Setup {
    pub fn describe() -> Setup {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map_or("unknown".into(), |(_, m)| m.trim().to_string());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let kib: f64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0);
        let revision = std::process::Command::new("git")
            .args(["describe", "--always", "--dirty"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map_or_else(|| "unknown".into(), |r| r.trim().to_string());
        Setup {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            model,
            memory_gib: kib / (1024.0 * 1024.0),
            revision,
        }
    }

    fn line(&self) -> String {
        format!(
            "{} cores ({}), {:.0} GiB memory",
            self.cores, self.model, self.memory_gib
        )
    }
}

impl Table {
    /// Columns padded to their widest cell, for a terminal.
    fn text(&self) -> String {
        let widths: Vec<usize> = (0..self.head.len())
            .map(|c| {
                self.rows
                    .iter()
                    .map(|r| r[c].chars().count())
                    .chain([self.head[c].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: Vec<&str>| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:>w$}"))
                .collect();
            format!("  {}\n", padded.join("  "))
        };
        let mut out = line(self.head.clone());
        for r in &self.rows {
            out += &line(r.iter().map(String::as_str).collect());
        }
        out
    }

    fn markdown(&self) -> String {
        let mut out = format!("| {} |\n", self.head.join(" | "));
        // Labels left, numbers right.
        out += &format!("|---|{}\n", "---:|".repeat(self.head.len() - 1));
        for r in &self.rows {
            out += &format!("| {} |\n", r.join(" | "));
        }
        out
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "NOT met"
    }
}

/// Prints one scenario's table and goals as soon as it is done.
pub fn print(outcome: &Outcome) {
    println!("\n== {}", outcome.title);
    for s in &outcome.settings {
        println!("  {s}");
    }
    print!("{}", outcome.table.text());
    for g in &outcome.goals {
        println!("  goal {}: {}", verdict(g.met), g.text);
    }
}

/// Where the JSON goes: `target/bench/`, honouring `CARGO_TARGET_DIR`.
fn json_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench")
}

/// Writes `target/bench/<scenario>.json` for every outcome and failure.
pub fn write_json(
    scale: Scale,
    date: &str,
    setup: &Setup,
    outcomes: &[Outcome],
    failures: &[Failure],
) -> std::io::Result<PathBuf> {
    let dir = json_dir();
    std::fs::create_dir_all(&dir)?;
    let common = json!({
        "scale": scale.name(),
        "date": date,
        "machine": {"cores": setup.cores, "model": setup.model, "memory_gib": setup.memory_gib},
        "revision": setup.revision,
    });
    for o in outcomes {
        let goals: Vec<Value> = o
            .goals
            .iter()
            .map(|g| json!({"goal": g.text, "met": g.met}))
            .collect();
        let doc = json!({
            "scenario": o.name, "run": common, "settings": o.settings,
            "results": o.data, "goals": goals,
        });
        write_pretty(&dir.join(format!("{}.json", o.name)), &doc)?;
    }
    for f in failures {
        let doc = json!({"scenario": f.name, "run": common, "error": f.why});
        write_pretty(&dir.join(format!("{}.json", f.name)), &doc)?;
    }
    Ok(dir)
}

fn write_pretty(path: &Path, doc: &Value) -> std::io::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(doc)? + "\n")
}

const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/BENCHMARKS.md");
const BEGIN: &str = "<!-- begin generated results: `make bench` rewrites this part -->";
const END: &str = "<!-- end generated results -->";

/// Rewrites the generated part of `docs/BENCHMARKS.md` (the whole file if it has no markers).
pub fn write_doc(
    date: &str,
    setup: &Setup,
    command: &str,
    outcomes: &[Outcome],
) -> std::io::Result<()> {
    let mut generated = format!(
        "{BEGIN}\n\n## Latest full run\n\n- Date: {date}\n- Machine: {}\n- Source: `{}`\n- Command: `{command}`\n",
        setup.line(),
        setup.revision
    );
    for o in outcomes {
        generated += &format!("\n### {}\n\n", o.title);
        for s in &o.settings {
            generated += &format!("- {s}\n");
        }
        generated += &format!("\n{}\n", o.table.markdown());
        for g in &o.goals {
            generated += &format!("Goal **{}**: {}  \n", verdict(g.met), g.text);
        }
    }
    generated += &format!("\n{END}");
    let old = std::fs::read_to_string(DOC).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{generated}{}", &old[..b], &old[e + END.len()..])
        }
        _ => format!("# Shoal benchmarks\n\n{generated}\n"),
    };
    std::fs::write(DOC, new)
}
