//! Tracing set-up shared by both binaries: `SHOAL_LOG` is the filter, `SHOAL_LOG_FORMAT` picks
//! readable text or JSON lines. Logs go to stderr so stdout stays free for the menu and commands.

use crate::config::LogFormat;
use tracing_subscriber::EnvFilter;

pub fn init(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(filter).map_err(|e| anyhow::anyhow!("SHOAL_LOG: {filter:?}: {e}"))?;
    // Colours only for a person at a terminal, never into files or container logs.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot start logging: {e}"))
}
