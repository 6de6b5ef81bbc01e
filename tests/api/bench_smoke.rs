//! A few seconds of the benchmark program against a real server, so that it cannot rot. Its
//! figures are not checked: speed never fails the test suite (see BENCHMARKS.md).

use std::process::Command;

#[test]
fn the_benchmark_runs_every_scenario_and_writes_its_results() {
    let out = std::env::temp_dir().join(format!("rapport-bench-smoke-{}.json", std::process::id()));
    let log = out.with_extension("csv");
    let status = Command::new(env!("CARGO_BIN_EXE_rapport-bench"))
        .args(["--server-bin", env!("CARGO_BIN_EXE_rapport")])
        .args([
            "--duration",
            "0.5",
            "--concurrency",
            "8",
            "--contacts",
            "300",
        ])
        .args([
            "--dispatch-messages",
            "300",
            "--e2e-rate",
            "10",
            "--idle-wait",
            "1",
            "--rules-probes",
            "1",
            "--import-rows",
            "2000",
            "--broadcast-contacts",
            "3000",
            "--broadcast-ingest-rate",
            "20",
            "--broadcast-lead",
            "2",
        ])
        .arg("--json")
        .arg(&out)
        .arg("--latency-log")
        .arg(&log)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run rapport-bench");
    assert!(status.success(), "rapport-bench failed: {status}");
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out).expect("the JSON results")).unwrap();
    let _ = std::fs::remove_file(&out);
    let rows = results["scenarios"].as_array().expect("scenarios");
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r["scenario"].as_str().unwrap().split('.').next().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "1", "2", "3", "3a", "3b", "3c", "4", "5", "6a", "6b", "7a", "7b", "7c", "7d", "7e",
            "8a", "8b", "8c", "8d"
        ],
        "{results}"
    );
    for row in rows {
        // 3c is 0 when no steady rate kept the lag under a second (not an error).
        if !row["scenario"].as_str().unwrap().starts_with("3c.") {
            assert!(row["throughput"].as_f64().unwrap() > 0.0, "{row}");
        }
    }
    // Scenario 1's raw limit is pgbench's where it runs, else the labelled fallback.
    let notes = rows[0]["notes"].as_str().unwrap();
    assert!(
        notes.contains("by pgbench -M prepared") || notes.contains("FALLBACK"),
        "{}",
        rows[0]
    );
    // Scenario 3 offers half of scenario 1's rate to 20 campaigns, open loop.
    assert_eq!(rows[2]["db_limit"], rows[0]["throughput"], "{}", rows[2]);
    assert!(
        rows[2]["notes"]
            .as_str()
            .unwrap()
            .contains("(half of scenario 1's rate)"),
        "{}",
        rows[2]
    );
    // Scenario 4 must never send a message twice, however fast it is.
    let dispatch = &rows[6];
    assert!(
        dispatch["notes"].as_str().unwrap().contains("duplicates 0"),
        "{dispatch}"
    );
    // The rules scenario's steady part offers half the rate its first part evaluated.
    let (evaluated, steady) = (&rows[3], &rows[4]);
    assert_eq!(steady["db_limit"], evaluated["throughput"], "{steady}");
    assert!(
        steady["notes"]
            .as_str()
            .unwrap()
            .contains("half of 3a's evaluation rate"),
        "{steady}"
    );
    // 3c bisects from 3b's run with one more (--rules-probes 1), against scenario 1's rate.
    let sustained = &rows[5];
    let notes = sustained["notes"].as_str().unwrap();
    let (_, tried) = notes.split_once("3b's first: ").expect("the probes");
    let probes = tried.split(", ").filter(|p| p.contains("/s ")).count();
    assert_eq!(probes, 2, "{sustained}");
    assert_eq!(sustained["db_limit"], rows[0]["throughput"], "{sustained}");
    assert!(results["server"]["peak_rss_mb"].as_f64().unwrap() > 0.0);
    // Contact batches against the raw UNNEST; single new contacts against scenario 1.
    for row in &rows[10..12] {
        assert!(row["db_limit"].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
    }
    for row in &rows[12..14] {
        assert_eq!(row["db_limit"], rows[0]["throughput"], "{row}");
    }
    // The broadcast reached every member once, and the paced one kept to its channel's rate.
    for row in &rows[15..19] {
        assert_eq!(row["errors"], 0, "{row}");
    }
    assert!(
        rows[16]["notes"].as_str().unwrap().contains("duplicates 0"),
        "{}",
        rows[16]
    );
    // The latency log has a line per request of the open loops (3, 3b, 6a, 6b).
    let log_text = std::fs::read_to_string(&log).expect("the latency log");
    let _ = std::fs::remove_file(&log);
    let mut lines = log_text.lines();
    assert_eq!(lines.next(), Some("scenario,start_us,latency_us"));
    let mut per_scenario: std::collections::BTreeMap<&str, usize> = Default::default();
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields.len(), 3, "{line}");
        assert!(
            fields[1].parse::<u64>().is_ok() && fields[2].parse::<u64>().is_ok(),
            "{line}"
        );
        *per_scenario.entry(fields[0]).or_default() += 1;
    }
    assert_eq!(
        per_scenario.keys().copied().collect::<Vec<_>>(),
        ["3", "3b", "6a", "6b"],
        "{per_scenario:?}"
    );
}
