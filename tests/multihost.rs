//! Many anteroom hosts behind a real HAProxy, in network namespaces (issue 15), short form: each scenario of
//! `bench/multihost.py` for a few seconds, with round-robin and plain health checks and then with the agent,
//! and the targets judged on the agent's runs. `bench/run --scenarios multihost` runs the long form
//! and writes the table in the README.
//!
//! The targets checked: a host reloaded or restarted onto a broken app, or restarted, costs no client
//! request; a burst of five times the capacity gets no 502 and every request an answer; a host ten times
//! slower gets less than half its round-robin share (the bench's target is a third; a few seconds leave
//! the first second, before the first agent check, too large a part).

mod common;

use std::process::Command;

#[test]
fn three_hosts_behind_haproxy_with_and_without_the_agent() {
    common::require("haproxy");
    common::require("ip");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("multihost.json");
    let out = Command::new("python3")
        .arg(common::root().join("bench/multihost.py"))
        .args([
            "--seconds",
            "5",
            "--burst-seconds",
            "2",
            "--queue-timeout",
            "5",
        ])
        .arg("--anteroom")
        .arg(common::BIN)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("python3 runs bench/multihost.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "bench/multihost.py failed:\n{stdout}\n{stderr}"
    );
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = doc["results"].as_array().unwrap();
    let run = |scenario: &str, agent: bool| {
        results
            .iter()
            .find(|r| r["scenario"] == scenario && r["agent"] == agent)
            .unwrap_or_else(|| panic!("no {scenario} run (agent {agent}):\n{stdout}"))
    };
    for s in ["crash", "broken", "restart"] {
        let r = run(s, true);
        assert_eq!(r["failed"], 0, "{s} with the agent: {r}\n{stdout}");
    }
    let burst = run("burst", true);
    assert_eq!(burst["codes"].get("502"), None, "{burst}");
    assert_eq!(burst["errors"], 0, "{burst}");
    let share = |r: &serde_json::Value| r["share"]["host3"].as_f64().unwrap();
    let (agent, plain) = (share(run("slow", true)), share(run("slow", false)));
    assert!(
        agent < plain / 2.0,
        "the slow host's share: {agent:.3} with the agent, {plain:.3} round-robin\n{stdout}"
    );
}
