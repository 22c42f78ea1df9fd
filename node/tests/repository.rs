//! The backup repository (`shoal_node::backup`, issue 20) on its own, against both
//! kinds of store it speaks: a local directory, and S3 as served by a real
//! S3-compatible server (moto's, installed from PyPI by `scripts/setup.sh`). A shard
//! engine's snapshot is stored, restored into a new directory and opened; a second
//! backup of the grown shard sends only what changed; a corrupted chunk is named by
//! verify and refused by a restore; prune keeps the newest.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shoal_engine::{CollectionConfig, Document, Metric, Shard};
use shoal_node::backup::{Pace, RepoError, Repository};

fn vector(seed: u64, d: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..d)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2000) as f32 / 1000.0 - 1.0
        })
        .collect()
}

fn docs(range: std::ops::Range<u64>) -> Vec<Document> {
    range
        .map(|i| Document {
            id: format!("d{i}"),
            text: Some(format!("document {i}")),
            metadata: Default::default(),
            vector: vector(i, 32),
        })
        .collect()
}

/// A shard with `n` documents and an index generation.
fn shard(dir: &Path, n: u64) -> Shard {
    let mut config = CollectionConfig::new(32, Metric::InnerProduct);
    config.index.nlist = 4;
    config.index.nbits = 4;
    config.nprobe = 4;
    config.train_sample = 256;
    let s = Shard::create(dir, config).unwrap();
    s.upsert(docs(0..n)).unwrap();
    s.rebuild(None).unwrap();
    s
}

/// Every document of `want` as `got` holds it.
fn same(want: &Shard, got: &Shard, n: u64) {
    assert_eq!(want.len(), got.len());
    assert_eq!(want.last(), got.last());
    for i in 0..n {
        let id = format!("d{i}");
        let (a, b) = (
            want.get(&id).unwrap().unwrap(),
            got.get(&id).unwrap().unwrap(),
        );
        assert_eq!((a.text, a.vector, a.seq), (b.text, b.vector, b.seq), "{id}");
    }
    assert_eq!(
        want.stats().serving.map(|g| g.id),
        got.stats().serving.map(|g| g.id)
    );
}

async fn exercise(url: &str, scratch: &Path, corrupt: impl Fn(&str)) {
    let repo = Repository::create(url).unwrap();
    assert_eq!(repo.init(4096).await.unwrap().chunk_bytes, 4096);
    // A second init keeps the repository's settings.
    assert_eq!(repo.init(1 << 20).await.unwrap().chunk_bytes, 4096);
    let s = shard(&scratch.join("src"), 500);
    let first = repo
        .backup_shard("one", 0, s.snapshot().unwrap(), &Pace::new(0))
        .await
        .unwrap();
    assert_eq!((first.seq, first.live_docs), (s.last().0, 500));
    assert_eq!(
        first.uploaded_bytes, first.bytes,
        "a new repository holds nothing"
    );
    // Restored and opened: the same documents at the same position, the same index.
    let restored = scratch.join("restored");
    repo.restore_shard(&first, &restored, &Pace::new(0), b"")
        .await
        .unwrap();
    same(&s, &Shard::open(&restored).unwrap(), 500);
    // Into an existing directory: refused.
    assert!(matches!(
        repo.restore_shard(&first, &restored, &Pace::new(0), b"")
            .await,
        Err(RepoError::Invalid(_))
    ));

    // The shard grows; a second backup stores the new tail and no more.
    s.upsert(docs(500..520)).unwrap();
    let second = repo
        .backup_shard("two", 0, s.snapshot().unwrap(), &Pace::new(0))
        .await
        .unwrap();
    let shared_prefix: u64 = first.files.iter().map(|f| f.len / 4096 * 4096).sum();
    assert!(
        second.uploaded_bytes <= second.bytes - shared_prefix,
        "{} uploaded of {}, {shared_prefix} shared",
        second.uploaded_bytes,
        second.bytes
    );
    assert!(second.uploaded_bytes > 0);
    let again = scratch.join("again");
    repo.restore_shard(&second, &again, &Pace::new(0), b"")
        .await
        .unwrap();
    same(&s, &Shard::open(&again).unwrap(), 520);

    // List: both, incomplete (no collection record: only the shard layer ran here).
    assert_eq!(repo.ids().await.unwrap(), ["one", "two"]);
    let v = repo.verify(Some("one")).await.unwrap();
    assert!(
        v.problems.iter().all(|p| p.contains("collection.json")),
        "{v:?}"
    );

    // A corrupted chunk of the second: named by verify's read, refused by a restore,
    // which leaves no directory behind.
    let victim = second
        .files
        .iter()
        .find(|f| f.name.starts_with("vectors"))
        .unwrap()
        .chunks[0]
        .sha256
        .clone();
    corrupt(&victim);
    let bad = scratch.join("bad");
    let e = repo
        .restore_shard(&second, &bad, &Pace::new(0), b"")
        .await
        .unwrap_err();
    assert!(
        matches!(&e, RepoError::Corrupt(m) if m.contains(&victim) && m.contains("vectors")),
        "{e}"
    );
    assert!(!bad.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_stored_in_a_directory_restores_whole_and_a_bad_chunk_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path().join("repo");
    let blobs = repo.join("blobs");
    exercise(&repo.display().to_string(), dir.path(), |sha| {
        let p = blobs.join(sha);
        let mut b = std::fs::read(&p).unwrap();
        b[0] ^= 1;
        std::fs::write(&p, b).unwrap();
    })
    .await;
    // Relative paths and unknown schemes are refused by name.
    for url in ["relative/dir", "ftp://x/y", ""] {
        let e = Repository::create(url).unwrap_err();
        assert!(e.to_string().contains("backup repository"), "{e}");
    }
    // A missing directory is not made by a reader.
    assert!(Repository::open(&dir.path().join("none").display().to_string()).is_err());
}

/// moto's S3 server on a free port, stopped when dropped.
struct Moto(Child, u16);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto_server() -> PathBuf {
    if let Ok(p) = std::env::var("SHOAL_MOTO_SERVER") {
        return p.into();
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let p = PathBuf::from(home).join(".cache/shoal/moto/bin/moto_server");
    assert!(
        p.exists(),
        "{} is missing: scripts/setup.sh installs moto's S3 server (or set SHOAL_MOTO_SERVER)",
        p.display()
    );
    p
}

fn http(port: u16, request: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn start_moto() -> Moto {
    let port = shoal_coordinator::testing::free_port();
    let child = Command::new(moto_server())
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server starts");
    let moto = Moto(child, port);
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "moto_server not listening"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    moto
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_stored_in_s3_restores_whole_and_a_bad_chunk_is_named() {
    let moto = start_moto();
    let port = moto.1;
    let made = http(
        port,
        &format!(
            "PUT /shoal-backups HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    );
    assert!(made.starts_with("HTTP/1.1 200"), "{made}");
    // The AWS environment a node or the CLI would be given (moto takes any key).
    for (k, v) in [
        ("AWS_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "shoal".into()),
        ("AWS_SECRET_ACCESS_KEY", "shoal-secret".into()),
        ("AWS_DEFAULT_REGION", "us-east-1".into()),
    ] {
        std::env::set_var(k, v);
    }
    let dir = tempfile::tempdir().unwrap();
    let url = "s3://shoal-backups/cluster-a";
    exercise(url, dir.path(), |sha| {
        // Overwrite the object with other bytes, as a faulty store or a hand would.
        use object_store::ObjectStore;
        let store = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name("shoal-backups")
            .build()
            .unwrap();
        let key = object_store::path::Path::from(format!("cluster-a/blobs/{sha}"));
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(store.put(&key, b"corrupted".to_vec().into()))
        })
        .unwrap();
    })
    .await;
    // A bucket that does not exist: a clear error naming the repository.
    let e = Repository::create("s3://no-such-bucket/x")
        .unwrap()
        .init(4096)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("s3://no-such-bucket/x"), "{e}");
    drop(moto);
}

/// A node's pace: chunks wait for their share of a second after the last one's (so a
/// throttled backup takes at least its bytes over the rate), and 0 never waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pace_spaces_chunks_by_their_bytes() {
    let pace = Pace::new(4000);
    let t = Instant::now();
    for _ in 0..3 {
        pace.take(1000).await;
    }
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    let free = Pace::new(0);
    let t = Instant::now();
    for _ in 0..1000 {
        free.take(1 << 30).await;
    }
    assert!(t.elapsed() < Duration::from_secs(1));
}
