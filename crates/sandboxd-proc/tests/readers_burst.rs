//! Reader threads kept between processes (`readers.rs`) under turns and bursts (review8). A binary
//! of its own, as `readers.rs`'s: its test counts every reader thread of the process.

mod common;

use std::time::Duration;

use common::{collect, eventually, sh};
use sandboxd_proc::{Process, Signal};

/// The threads of ours whose name is a process's (`proc-<pid>`).
fn reader_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with("proc-"))
        })
        .count()
}

/// A kept thread carries nothing of its last process into the next: pipes with stdin, a PTY and
/// a killed process in turn on the same kept threads, each with its own output and end (review8).
#[test]
fn kept_threads_follow_pipes_a_pty_stdin_and_a_kill_in_turn_and_a_burst_of_fifty() {
    for round in 0..3 {
        let cat = Process::spawn(&sh("cat; exit 5").io(sandboxd_proc::Io::Pipes { stdin: true }))
            .unwrap();
        cat.write_stdin(format!("in{round}").as_bytes(), Duration::from_secs(5))
            .unwrap();
        cat.close_stdin().unwrap();
        let out = collect(&cat);
        assert_eq!(out.stdout_str(), format!("in{round}"));
        assert_eq!(out.end().exit_code, 5);

        let pty = Process::spawn(&common::sh_pty("printf pty$((1+1)); exit 3", 80, 24)).unwrap();
        let out = collect(&pty);
        assert!(out.pty_str().contains("pty2"), "{:?}", out.pty_str());
        assert!(out.stdout.is_empty());
        assert_eq!(out.end().exit_code, 3);

        let split = common::run(&sh("echo out; echo err >&2; exit 7"));
        assert_eq!(split.stdout_str(), "out\n");
        assert_eq!(split.stderr, b"err\n");
        assert_eq!(split.end().exit_code, 7);

        let killed = Process::spawn(&sh("exec sleep 100")).unwrap();
        killed.signal(Signal::SIGKILL).unwrap();
        assert_eq!(collect(&killed).end().status, "signal: killed");
    }

    // A burst of fifty from five threads at once: the list of kept threads is taken and filled
    // from all of them while their processes end.
    let starters: Vec<_> = (0..5)
        .map(|t| {
            std::thread::spawn(move || {
                let procs: Vec<_> = (0..10)
                    .map(|i| {
                        let n = t * 10 + i;
                        let opts = if n % 2 == 0 {
                            sh(&format!("echo {n}; exit {}", n % 7))
                        } else {
                            common::sh_pty(&format!("echo {n}; exit {}", n % 7), 80, 24)
                        };
                        (n, Process::spawn(&opts).unwrap())
                    })
                    .collect();
                for (n, process) in procs {
                    let out = collect(&process);
                    let text = if n % 2 == 0 {
                        out.stdout_str()
                    } else {
                        out.pty_str()
                    };
                    assert_eq!(text.trim_end(), n.to_string(), "process {n}");
                    assert_eq!(out.end().exit_code, n % 7, "process {n}");
                    assert!(common::is_dead(process.pid() as i32));
                }
            })
        })
        .collect();
    for starter in starters {
        starter.join().unwrap();
    }
    // Then no more than two are kept, and those leave a quarter of a second later.
    assert!(eventually(Duration::from_secs(5), || reader_threads() == 0));
}
