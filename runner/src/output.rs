//! Everything Idem prints passes through here: secrets hidden
//! ([`idem_config::redact`]) and a closed pipe (`idem check | head -1`)
//! ending the output quietly instead of a panic.

use std::io::{self, Write};

/// Write `text` and a newline to `out`, secrets hidden. A reader that went
/// away (broken pipe) is not an error of Idem's: the rest is dropped.
pub fn line(mut out: impl Write, text: &str) {
    let text = idem_config::redact::text(text);
    let _ = writeln!(out, "{text}");
}

/// `println!` with secrets hidden and no panic on a closed pipe.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {
        $crate::output::line(::std::io::stdout().lock(), &format!($($arg)*))
    };
}

/// `eprintln!` with secrets hidden.
#[macro_export]
macro_rules! say_err {
    ($($arg:tt)*) => {
        $crate::output::line(::std::io::stderr().lock(), &format!($($arg)*))
    };
}

/// The log writer: each formatted event (human or JSON) is written with
/// secrets hidden.
#[derive(Clone, Copy, Default)]
pub struct RedactedStderr;

impl Write for RedactedStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let shown = idem_config::redact::text(&text);
        match io::stderr().lock().write_all(shown.as_bytes()) {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e),
            _ => {}
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactedStderr {
    type Writer = RedactedStderr;

    fn make_writer(&'a self) -> Self::Writer {
        RedactedStderr
    }
}
