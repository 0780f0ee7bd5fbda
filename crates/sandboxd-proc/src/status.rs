//! How a finished process is reported: the kernel hands `waitpid(2)` a wait status word (exit code in
//! bits 8..15, or the terminating signal in bits 0..6 plus the core-dump bit 7), and envd turns Go's
//! `os.ProcessState` for that word into an `EndEvent` (spec §4.2). This module does the same
//! translation, including Go's exact signal names (`syscall.Signal.String()` on Linux).

use std::borrow::Cow;
use std::fmt;

/// How a process ended, in the shape of envd's `ProcessEvent.EndEvent`.
///
/// envd mapping (spec §4.2): a normal exit with code N gives `exited = true`, `exit_code = N`,
/// `status = "exit status N"`, and `error = None` for N = 0, else `Some("exit status N")`. Death by
/// a signal gives `exited = false`, `exit_code = -1`, `status = "signal: <go name>"` (for example
/// `"signal: killed"`), with `" (core dumped)"` appended when the kernel wrote a core, and
/// `error` the same text as `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct End {
    /// True when the process called `exit` (or returned from `main`); false when a signal killed it.
    pub exited: bool,
    /// The exit code for a normal exit; -1 when a signal killed the process (Go's `ExitCode()`).
    pub exit_code: i32,
    /// Go's `ProcessState.String()`: `"exit status N"` or `"signal: <name>"`.
    pub status: String,
    /// `None` for a successful exit; otherwise the same text as `status` (Go's `ExitError.Error()`).
    pub error: Option<String>,
    /// The terminating signal number, when a signal killed the process.
    pub signal: Option<i32>,
    /// True when the kernel reports that a core dump was written.
    pub core_dumped: bool,
}

impl End {
    /// Decodes a raw wait status word as returned by `waitpid(2)` for a terminated child.
    ///
    /// A status that is neither an exit nor a signal death (it cannot happen here because stopped
    /// children are never waited for with `WUNTRACED`) is reported like an unknown signal death.
    pub fn from_wait_status(raw: i32) -> End {
        if libc::WIFEXITED(raw) {
            return End::exited(libc::WEXITSTATUS(raw));
        }
        let signal = if libc::WIFSIGNALED(raw) {
            libc::WTERMSIG(raw)
        } else {
            0
        };
        End::signaled(signal, libc::WCOREDUMP(raw))
    }

    /// The end of a process that exited normally with `code`.
    pub fn exited(code: i32) -> End {
        let status = format!("exit status {code}");
        End {
            exited: true,
            exit_code: code,
            error: (code != 0).then(|| status.clone()),
            status,
            signal: None,
            core_dumped: false,
        }
    }

    /// The end of a process killed by `signal` (with `core_dumped` when the kernel wrote a core).
    pub fn signaled(signal: i32, core_dumped: bool) -> End {
        let mut status = format!("signal: {}", signal_name(signal));
        if core_dumped {
            status.push_str(" (core dumped)");
        }
        End {
            exited: false,
            exit_code: -1,
            error: Some(status.clone()),
            status,
            signal: Some(signal),
            core_dumped,
        }
    }

    /// The end reported when the exit status could not be collected, because something else in
    /// this process reaped the child first (for example `SIGCHLD` set to `SIG_IGN`, or a
    /// `waitpid(-1)` elsewhere). It looks like a signal death with an explanatory status.
    pub fn unknown(reason: &str) -> End {
        let status = format!("unknown: {reason}");
        End {
            exited: false,
            exit_code: -1,
            error: Some(status.clone()),
            status,
            signal: None,
            core_dumped: false,
        }
    }

    /// True for a normal exit with code 0 (Go's `ProcessState.Success()`).
    pub fn success(&self) -> bool {
        self.exited && self.exit_code == 0
    }
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.status)
    }
}

/// Go's Linux signal names (`syscall/zerrors_linux_amd64.go`, the same on arm64), indexed by signal
/// number. Go prints numbers outside this table as `"signal N"`.
const GO_SIGNAL_NAMES: [&str; 32] = [
    "",
    "hangup",
    "interrupt",
    "quit",
    "illegal instruction",
    "trace/breakpoint trap",
    "aborted",
    "bus error",
    "floating point exception",
    "killed",
    "user defined signal 1",
    "segmentation fault",
    "user defined signal 2",
    "broken pipe",
    "alarm clock",
    "terminated",
    "stack fault",
    "child exited",
    "continued",
    "stopped (signal)",
    "stopped",
    "stopped (tty input)",
    "stopped (tty output)",
    "urgent I/O condition",
    "CPU time limit exceeded",
    "file size limit exceeded",
    "virtual timer expired",
    "profiling timer expired",
    "window changed",
    "I/O possible",
    "power failure",
    "bad system call",
];

/// The name Go's `syscall.Signal.String()` gives signal number `signal` on Linux: `"killed"` for 9,
/// `"terminated"` for 15, and `"signal N"` for numbers it has no name for (real-time signals).
pub fn signal_name(signal: i32) -> Cow<'static, str> {
    match usize::try_from(signal)
        .ok()
        .and_then(|i| GO_SIGNAL_NAMES.get(i))
    {
        Some(name) if !name.is_empty() => Cow::Borrowed(name),
        _ => Cow::Owned(format!("signal {signal}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_map_like_envd() {
        let ok = End::exited(0);
        assert!(ok.exited && ok.exit_code == 0 && ok.error.is_none());
        assert_eq!(ok.status, "exit status 0");
        let three = End::from_wait_status(3 << 8);
        assert_eq!(three, End::exited(3));
        assert_eq!(three.error.as_deref(), Some("exit status 3"));
    }

    #[test]
    fn signals_map_like_go() {
        let killed = End::from_wait_status(libc::SIGKILL);
        assert!(!killed.exited);
        assert_eq!(killed.exit_code, -1);
        assert_eq!(killed.status, "signal: killed");
        assert_eq!(killed.error.as_deref(), Some("signal: killed"));
        let core = End::from_wait_status(libc::SIGSEGV | 0x80);
        assert_eq!(core.status, "signal: segmentation fault (core dumped)");
        assert_eq!(signal_name(libc::SIGTERM), "terminated");
        assert_eq!(signal_name(libc::SIGINT), "interrupt");
        assert_eq!(signal_name(libc::SIGHUP), "hangup");
        assert_eq!(signal_name(libc::SIGABRT), "aborted");
        assert_eq!(signal_name(libc::SIGPIPE), "broken pipe");
        assert_eq!(signal_name(libc::SIGQUIT), "quit");
        assert_eq!(signal_name(libc::SIGUSR1), "user defined signal 1");
        assert_eq!(signal_name(libc::SIGSYS), "bad system call");
        assert_eq!(signal_name(34), "signal 34");
        assert_eq!(signal_name(0), "signal 0");
    }
}
