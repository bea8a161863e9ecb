//! Tracing set-up shared by both binaries: `SHOAL_LOG` is the filter, `SHOAL_LOG_FORMAT` picks
//! readable text or JSON lines. Logs go to stderr so stdout stays free for the menu and commands.
//! JSON lines are JSON all the way down: numbers stay numbers and the settings an object.

use crate::config::LogFormat;
use serde_json::{Map, Value};
use std::fmt;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{FormatEvent, FormatFields, JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The one field that carries a structure: the effective settings, logged as JSON text and
/// written into JSON lines as an object.
pub const CONFIG_FIELD: &str = "config";

/// Installs the global subscriber: `filter` in `EnvFilter` syntax, lines in `format`, on stderr.
pub fn init(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter).map_err(|e| {
        anyhow::anyhow!(
            "SHOAL_LOG: {filter:?} is not a log filter such as info or warn,shoal=debug: {e}"
        )
    })?;
    // Colours only for a person at a terminal, never into files or container logs.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let result = match format {
        LogFormat::Json => builder
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("cannot start logging: {e}"))
}

/// One JSON object per event: `timestamp`, `level`, the event's fields (`message` among them),
/// `target`, and the enclosing spans (`span` the innermost, `spans` from the root).
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut now = String::new();
        SystemTime.format_time(&mut Writer::new(&mut now))?;
        let mut line = vec![
            ("timestamp".to_string(), Value::from(now)),
            ("level".into(), event.metadata().level().as_str().into()),
        ];
        event.record(&mut Fields(&mut line));
        line.push(("target".into(), event.metadata().target().into()));
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope
                .from_root()
                .map(|span| {
                    let mut fields = span
                        .extensions()
                        .get::<FormattedFields<N>>()
                        .and_then(|f| serde_json::from_str::<Map<String, Value>>(f).ok())
                        .unwrap_or_default();
                    fields.insert("name".into(), span.name().into());
                    Value::Object(fields)
                })
                .collect();
            if let Some(innermost) = spans.last() {
                line.push(("span".into(), innermost.clone()));
            }
            line.push(("spans".into(), spans.into()));
        }
        write_object(&mut writer, &line)
    }
}

/// Writes `pairs` as one JSON object line, in their order: a reader's eye finds the time and
/// level first and the message before the details.
fn write_object(writer: &mut Writer<'_>, pairs: &[(String, Value)]) -> fmt::Result {
    writer.write_char('{')?;
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            writer.write_char(',')?;
        }
        write!(writer, "{}:{value}", Value::from(key.as_str()))?;
    }
    writer.write_str("}\n")
}

/// Collects an event's fields, in the order they were written, as JSON values of their own type.
struct Fields<'a>(&'a mut Vec<(String, Value)>);

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        self.0.push((field.name().to_string(), value));
    }

    fn put_text(&mut self, field: &Field, text: String) {
        let value = match field.name() {
            CONFIG_FIELD => serde_json::from_str(&text).unwrap_or(Value::String(text)),
            _ => Value::String(text),
        };
        self.put(field, value);
    }
}

impl Visit for Fields<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put_text(field, value.to_string());
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put_text(field, value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put_text(field, format!("{value:?}"));
    }
}
