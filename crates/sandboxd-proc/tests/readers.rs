//! Reader threads kept between processes (`readers.rs`). A binary of its own: the other tests'
//! processes, run in parallel, would take the kept thread.

mod common;

use std::time::Duration;

use common::{collect, eventually, sh};
use sandboxd_proc::{Process, Signal};

/// The thread of ours named `name`, if any.
fn thread_named(name: &str) -> Option<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(Result::ok)
        .find(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .map(|t| t.file_name().to_string_lossy().into_owned())
}

#[test]
fn the_next_process_is_followed_by_the_thread_of_the_last_one_renamed() {
    let first = Process::spawn(&sh("sleep 0.3; echo one")).unwrap();
    let mut tid = None;
    assert!(eventually(Duration::from_secs(5), || {
        tid = thread_named(&format!("proc-{}", first.pid()));
        tid.is_some()
    }));
    let out = collect(&first);
    assert_eq!(out.stdout_str(), "one\n");
    assert_eq!(out.end().exit_code, 0);
    std::thread::sleep(Duration::from_millis(100)); // back to waiting for the next one

    let second = Process::spawn(&sh("exec sleep 100")).unwrap();
    let mut next = None;
    assert!(eventually(Duration::from_secs(5), || {
        next = thread_named(&format!("proc-{}", second.pid()));
        next.is_some()
    }));
    assert_eq!(next, tid, "a new thread followed the next process");
    second.signal(Signal::SIGKILL).unwrap();
    let end = collect(&second);
    assert_eq!(end.end().status, "signal: killed");
    // The kept thread reaped it, as a new one would have.
    let pid = second.pid();
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "pid {pid} not reaped"
    );
}
