//! Command output on stdout. A reader that stops reading (`kmmr-replica status | head -1`)
//! closes the pipe: the command then ends quietly with success, as a program killed by SIGPIPE
//! would in a shell pipeline, instead of panicking as `println!` does.

use std::io::Write;

/// Writes one line of command output; see [`outln!`].
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    ended(written);
}

/// Writes `bytes` to stdout exactly as they are (a value for a file or a pipe).
pub fn raw(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    ended(out.write_all(bytes).and_then(|()| out.flush()));
}

/// Ends the process when stdout is gone: quietly when the reader closed the pipe.
fn ended(written: std::io::Result<()>) {
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// `println!` for command output, safe against a closed pipe.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::out::line(format_args!($($arg)*))
    };
}

pub(crate) use outln;
