//! Command-line pieces both binaries share: the settings-file and logging flags, how flags
//! become setting overrides, port arguments, and the `completions` and `man` subcommands
//! (generated from the clap definitions, so they never disagree with `--help`).

use clap::{Args, Command, Subcommand};
use clap_complete::Shell;
use std::io::Write;
use std::path::PathBuf;

/// Flag values to lay over the other settings layers: the settings file to read, and
/// `(setting key, value)` pairs.
#[derive(Default)]
pub struct Overrides {
    pub file: Option<PathBuf>,
    pub flags: Vec<(&'static str, String)>,
}

impl Overrides {
    /// Records `value` for the setting `key` if the flag was given.
    pub fn set(&mut self, key: &'static str, value: &Option<String>) {
        if let Some(v) = value {
            self.flags.push((key, v.clone()));
        }
    }

    /// Whether a flag set the setting `key`.
    pub fn has(&self, key: &str) -> bool {
        self.flags.iter().any(|(k, _)| *k == key)
    }
}

/// `--config`, for every command that reads settings.
#[derive(Args)]
pub struct ConfigFile {
    /// Settings file, TOML or JSON; keys are the variable names without SHOAL_, in lower case
    /// [env: SHOAL_CONFIG].
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigFile {
    pub fn add_to(&self, o: &mut Overrides) {
        o.file.clone_from(&self.config);
    }
}

/// The flags of every command that runs long enough to log, and talks to other Shoal processes.
#[derive(Args)]
pub struct Common {
    #[command(flatten)]
    file: ConfigFile,
    /// Log filter, e.g. info or warn,shoal=debug [env: SHOAL_LOG].
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// Log lines as readable text or one JSON object each [env: SHOAL_LOG_FORMAT, default text].
    #[arg(long, value_name = "FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// PEM certificate this program shows; set, it speaks TLS [env: SHOAL_TLS_CERT].
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<String>,
    /// PEM private key of --tls-cert [env: SHOAL_TLS_KEY].
    #[arg(long, value_name = "FILE")]
    tls_key: Option<String>,
    /// PEM CA bundle the other side's certificate must chain to; makes TLS mutual
    /// [env: SHOAL_TLS_CA].
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<String>,
}

impl Common {
    pub fn add_to(&self, o: &mut Overrides) {
        self.file.add_to(o);
        o.set("log", &self.log);
        o.set("log_format", &self.log_format);
        o.set("tls_cert", &self.tls_cert);
        o.set("tls_key", &self.tls_key);
        o.set("tls_ca", &self.tls_ca);
    }
}

/// A TCP port argument, with a message that says what a port is.
pub fn port(text: &str) -> Result<u16, String> {
    text.parse()
        .map_err(|_| format!("{text} is not a port number: ports are 0 to 65535"))
}

/// The subcommands both binaries share for installing their own documentation.
#[derive(Subcommand)]
pub enum Manual {
    /// Print a shell completion script, e.g. `completions bash > /etc/bash_completion.d/NAME`.
    Completions {
        /// The shell to complete for.
        shell: Shell,
    },
    /// Print the man page (roff), e.g. `man | man -l -`.
    Man,
}

impl Manual {
    /// Writes what was asked for, for the program described by `command`, to stdout. A reader
    /// that stops early (`| head`) is no error.
    pub fn print(&self, mut command: Command) -> std::io::Result<()> {
        let mut text = Vec::new();
        match self {
            Manual::Completions { shell } => {
                let name = command.get_name().to_string();
                clap_complete::generate(*shell, &mut command, name, &mut text);
            }
            Manual::Man => clap_mangen::Man::new(command).render(&mut text)?,
        }
        let mut out = std::io::stdout().lock();
        match out.write_all(&text).and_then(|()| out.flush()) {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other,
        }
    }
}
