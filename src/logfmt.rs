//! `--log-format logfmt`: one line per event, `key=value` pairs only, quoted where needed, so that log
//! shippers (Loki, Vector, Heroku-style pipelines) parse every field, the message included.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

pub struct Logfmt;

impl<S, N> FormatEvent<S, N> for Logfmt
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        write!(
            w,
            "ts={}.{:06} level={} target={}",
            now.as_secs(),
            now.subsec_micros(),
            meta.level().as_str().to_ascii_lowercase(),
            meta.target()
        )?;
        let mut v = Fields { out: String::new() };
        event.record(&mut v);
        // The fields of the spans the event happened in (a request's `request_id`), outermost first: as
        // the span's formatter wrote them, `key=value` separated by spaces.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(f) = ext.get::<FormattedFields<N>>().filter(|f| !f.is_empty()) {
                    v.out.push(' ');
                    v.out.push_str(f);
                }
            }
        }
        writeln!(w, "{}", v.out)
    }
}

struct Fields {
    out: String,
}

impl Fields {
    fn push(&mut self, key: &str, value: &str) {
        self.out.push(' ');
        self.out
            .push_str(if key == "message" { "msg" } else { key });
        self.out.push('=');
        quote(&mut self.out, value);
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.push(field.name(), value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.push(field.name(), &format!("{value:?}"));
    }
}

/// Bare when it is a plain token, else in double quotes with `"`, `\` and control characters escaped.
fn quote(out: &mut String, v: &str) {
    let bare = !v.is_empty()
        && v.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if bare {
        out.push_str(v);
        return;
    }
    out.push('"');
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::quote;

    #[test]
    fn quoting() {
        let q = |v: &str| {
            let mut s = String::new();
            quote(&mut s, v);
            s
        };
        assert_eq!(q("GET"), "GET");
        assert_eq!(q("worker died"), "\"worker died\"");
        assert_eq!(q("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
        assert_eq!(q(""), "\"\"");
        assert_eq!(q("k=v"), "\"k=v\"");
    }
}
