//! `shoal import` as an operator runs it (issue 18): the command as a process against a
//! cluster of processes. Every format (.npy, .fvecs, .bvecs, JSONL, Parquet) lands every
//! row with its exact vector and id; a bad file stops with an error naming the file and
//! the row; an import SIGKILLed midway
//! and rerun with the same command resumes past what was acknowledged, and the
//! collection ends with exactly the file's rows (no row skipped, none twice).

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use shoal_chaos_tests::{connect, eventually, live_docs, Cluster, DIM};
use shoal_cli::vectors::{write_npy, write_vecs, Row};
use shoal_cli::write_parquet;
use shoal_proto::v1 as pb;

/// A distinct vector per row (small integers, so `.bvecs` holds them exactly).
fn row(i: u64) -> Vec<f32> {
    (0..DIM as u64)
        .map(|j| ((i * 31 + j * 7) % 251) as f32)
        .collect()
}

fn run(mut c: Command) -> (Output, serde_json::Value) {
    let out = c.output().expect("running shoal import");
    let summary = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    (out, summary)
}

fn import(c: &Cluster, file: &Path, collection: &str, extra: &[&str]) -> Command {
    let mut cmd = c.command();
    cmd.arg("import")
        .arg(file)
        .args([
            "--collection",
            collection,
            "--shards",
            "3",
            "--metric",
            "l2",
        ])
        .args(extra)
        .stdin(Stdio::null());
    cmd
}

/// Waits until the primaries report `n` live documents, then checks `ids` by get.
async fn check(c: &Cluster, collection: &str, n: u64, ids: &[(String, Vec<f32>)]) {
    let what = format!("{collection}: {n} live documents reported");
    eventually(Duration::from_secs(20), what, || async {
        (live_docs(&c.shards(collection).await) == n).then_some(())
    })
    .await;
    let mut g = connect(&c.nodes[1].public).await.expect("connect");
    for (id, v) in ids {
        let r = g
            .get(pb::GetRequest {
                collection: collection.into(),
                id: id.clone(),
                with_vector: true,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.found, "{collection}: {id} missing");
        assert_eq!(&r.document.unwrap().vector, v, "{collection}: {id}");
    }
}

/// The stored text and metadata of `id`, read back through a gateway.
async fn assert_text_and_metadata(c: &Cluster, collection: &str, id: &str, text: &str, meta: &str) {
    let mut g = connect(&c.nodes[0].public).await.unwrap();
    let d = g
        .get(pb::GetRequest {
            collection: collection.into(),
            id: id.into(),
            with_vector: false,
        })
        .await
        .unwrap()
        .into_inner()
        .document
        .unwrap();
    assert_eq!(
        (d.text.as_str(), d.metadata_json.as_str()),
        (text, meta),
        "{collection}: {id}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_format_lands_every_row_and_a_bad_file_names_its_row() {
    let c = Cluster::start(2).await;
    let dir = tempfile::tempdir().unwrap();
    let n = 1_000u64;
    let vs: Vec<Vec<f32>> = (0..n).map(row).collect();

    // .npy with an ids sidecar.
    let npy = dir.path().join("v.npy");
    write_npy(&npy, n, DIM, |i, v| v.extend(&vs[i as usize])).unwrap();
    let ids = dir.path().join("v.ids");
    std::fs::write(
        &ids,
        (0..n).map(|i| format!("npy-{i:06}\n")).collect::<String>(),
    )
    .unwrap();
    let (out, s) = run(import(
        &c,
        &npy,
        "npy",
        &["--ids", ids.to_str().unwrap(), "--batch", "64"],
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        (s["rows"].as_u64(), s["sent"].as_u64()),
        (Some(n), Some(n)),
        "{s}"
    );
    let sample: Vec<(String, Vec<f32>)> = (0..n)
        .step_by(37)
        .map(|i| (format!("npy-{i:06}"), vs[i as usize].clone()))
        .collect();
    check(&c, "npy", n, &sample).await;

    // .fvecs and .bvecs: ids are row numbers.
    for (name, bytes) in [("v.fvecs", false), ("v.bvecs", true)] {
        let p = dir.path().join(name);
        write_vecs(&p, &vs, bytes).unwrap();
        let coll = name.replace('.', "-");
        let (out, s) = run(import(
            &c,
            &p,
            &coll,
            &["--gateways", &c.all_nodes().join(",")],
        ));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(s["gateways"].as_u64(), Some(2), "{s}");
        let sample: Vec<(String, Vec<f32>)> = (0..n)
            .step_by(41)
            .map(|i| (i.to_string(), vs[i as usize].clone()))
            .collect();
        check(&c, &coll, n, &sample).await;
    }

    // JSONL with ids, text and metadata.
    let p = dir.path().join("v.jsonl");
    let body: String = (0..n)
        .map(|i| {
            serde_json::json!({"id": format!("j{i}"), "vector": vs[i as usize], "text": format!("row {i}"), "metadata": {"i": i}})
                .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&p, body).unwrap();
    let (out, _) = run(import(&c, &p, "jsonl", &[]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check(&c, "jsonl", n, &[("j999".into(), vs[999].clone())]).await;
    assert_text_and_metadata(&c, "jsonl", "j5", "row 5", "{\"i\":5}").await;

    // Parquet, a fixed-size list column with ids, text and metadata, in row groups
    // smaller than a batch.
    let p = dir.path().join("v.parquet");
    let rows = (0..n).map(|i| Row {
        id: format!("pq-{i}"),
        vector: vs[i as usize].clone(),
        text: format!("parquet row {i}"),
        metadata_json: format!("{{\"i\":{i}}}"),
    });
    write_parquet(&p, rows, DIM, true, 300).unwrap();
    let (out, s) = run(import(&c, &p, "parquet", &["--batch", "128"]));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(s["rows"].as_u64(), Some(n), "{s}");
    let sample: Vec<(String, Vec<f32>)> = (0..n)
        .step_by(43)
        .map(|i| (format!("pq-{i}"), vs[i as usize].clone()))
        .collect();
    check(&c, "parquet", n, &sample).await;
    assert_text_and_metadata(&c, "parquet", "pq-7", "parquet row 7", "{\"i\":7}").await;

    // A bad row stops the import with the file and the row named; the rows before it
    // that were acknowledged are recorded as done.
    let p = dir.path().join("bad.jsonl");
    let mut lines: Vec<String> = (0..300)
        .map(|i| serde_json::json!({"id": format!("b{i}"), "vector": vs[i]}).to_string())
        .collect();
    lines[250] = "{\"id\": \"b250\", \"vector\": [1, 2]}".into();
    std::fs::write(&p, lines.join("\n")).unwrap();
    let (out, _) = run(import(
        &c,
        &p,
        "bad",
        &["--batch", "50", "--concurrency", "1"],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad.jsonl: line 251 (row 250): `vector` has 2 values"),
        "{err}"
    );
    assert!(err.contains("a rerun of the same command resumes"), "{err}");
    // A vector of the wrong dimension for an existing collection is refused up front.
    let p = dir.path().join("wide.fvecs");
    write_vecs(&p, &[vec![1.0; DIM + 1]], false).unwrap();
    let (out, _) = run(import(&c, &p, "npy", &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "holds {}-d vectors but collection npy is {DIM}-d",
            DIM + 1
        )),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_import_killed_midway_resumes_without_skipping_or_repeating_a_row() {
    let c = Cluster::start(2).await;
    let dir = tempfile::tempdir().unwrap();
    // Not a multiple of the batch: the last chunk is short.
    let n = 30_017u64;
    let npy = dir.path().join("big.npy");
    write_npy(&npy, n, DIM, |i, v| v.extend(row(i))).unwrap();
    let progress = dir.path().join("big.npy.shoal-import");
    let args = ["--batch", "50", "--concurrency", "2"];

    // Killed once the progress file shows acknowledged rows.
    let mut child = import(&c, &npy, "big", &args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let killed_at = loop {
        let done = std::fs::read_to_string(&progress)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["rows_done"].as_u64())
            .unwrap_or(0);
        if done > 0 {
            child.kill().unwrap();
            child.wait().unwrap();
            break done;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the import finished before it could be killed"
        );
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no progress recorded"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(killed_at < n, "killed at {killed_at}");

    // The same command again: resumes at or past the recorded row, sends the rest.
    let (out, s) = run(import(&c, &npy, "big", &args));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resumed = s["resumed_from"].as_u64().unwrap();
    assert!(
        resumed >= killed_at && resumed < n,
        "{s} (killed at {killed_at})"
    );
    assert_eq!(s["sent"].as_u64(), Some(n - resumed), "{s}");
    assert_eq!(s["rows"].as_u64(), Some(n), "{s}");
    let sample: Vec<(String, Vec<f32>)> = (0..n)
        .step_by(997)
        .chain([resumed - 1, resumed, n - 1])
        .map(|i| (i.to_string(), row(i)))
        .collect();
    check(&c, "big", n, &sample).await;

    // A third run finds the import complete and sends nothing.
    let (out, s) = run(import(&c, &npy, "big", &args));
    assert!(out.status.success());
    assert_eq!(
        (s["sent"].as_u64(), s["rows"].as_u64()),
        (Some(0), Some(n)),
        "{s}"
    );
    eprintln!(
        "{}",
        serde_json::json!({"test": "import_resume", "rows": n, "killed_at": killed_at, "resumed_from": resumed})
    );
}
