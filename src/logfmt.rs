//! `--log-format logfmt`: one line per event, `key=value` pairs only, quoted where needed, so that log
//! shippers (Loki, Vector, Heroku-style pipelines) parse every field, the message included. Also the access
//! log's date ([`clf_time`]).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

/// `10/Oct/2000:13:55:36 +0000`, the access log's time (Common Log Format), in UTC.
///
/// httpdate does the calendar; its IMF-fixdate (`Tue, 10 Oct 2000 13:55:36 GMT`) has the same fields at fixed
/// places for every year it accepts, so they are only rearranged. It panics outside 1970-9999, so the clock
/// is held within those years first: a clock set wrong must not take the access log down.
pub fn clf_time(t: SystemTime) -> String {
    // 9999-12-31T23:59:59Z.
    let last = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    let d = httpdate::fmt_http_date(t.clamp(UNIX_EPOCH, last));
    match (d.get(5..7), d.get(8..11), d.get(12..16), d.get(17..25)) {
        (Some(day), Some(month), Some(year), Some(time)) => {
            format!("{day}/{month}/{year}:{time} +0000")
        }
        // Not reached: the format is fixed-width. An odd date is still better than no log line.
        _ => d,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn span_fields_follow_the_event_fields() {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || SharedBuf(sink.clone()))
            .event_format(Logfmt)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("request", request_id = %"r-1");
            let _in = span.enter();
            tracing::info!(limit = 3, "queue full");
            tracing::info!(parent: None, "outside");
        });
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].ends_with(r#" msg="queue full" limit=3 request_id=r-1"#),
            "{text}"
        );
        assert!(lines[1].ends_with(" msg=outside"), "{text}");
    }

    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn clf_dates() {
        let at = |s: u64| clf_time(UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(971_186_136), "10/Oct/2000:13:55:36 +0000");
        assert_eq!(at(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(at(951_782_400), "29/Feb/2000:00:00:00 +0000");
        // Outside httpdate's years: held at the edges, no panic.
        assert_eq!(
            clf_time(UNIX_EPOCH - Duration::from_secs(1)),
            "01/Jan/1970:00:00:00 +0000"
        );
        assert_eq!(at(u64::from(u32::MAX) * 100), "31/Dec/9999:23:59:59 +0000");
    }

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
