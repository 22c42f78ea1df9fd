//! `shoal backup` (issue 20): create (a cluster operation: each shard's primary stores
//! its shard into the repository at one recorded position), restore (a new collection
//! whose primaries read their shards back, checked chunk by chunk), and what reads the
//! repository alone: list, verify, prune. The repository is `shoal_node::backup`.

use std::time::Duration;

use clap::Subcommand;
use shoal_node::backup::Repository;
use shoal_proto::client::Client;
use shoal_proto::coordinator as cpb;

use crate::coordinator::{follow_operation, print_json, Target};

#[derive(Subcommand)]
pub enum BackupCmd {
    /// Backs up COLLECTION into the repository at URL (a directory every node reaches,
    /// `file:///dir`, or `s3://bucket/prefix` with the AWS_* environment on the nodes):
    /// every shard at one recorded position, writes and queries going on; only chunks
    /// the repository lacks are sent. With `--wait`, follows it to its end.
    Create {
        #[command(flatten)]
        target: Target,
        collection: String,
        #[arg(long)]
        to: String,
        /// The backup's id (default: COLLECTION-<unix ms>).
        #[arg(long)]
        id: Option<String>,
        /// Chunk size of a repository used for the first time (later backups use the
        /// repository's): larger means fewer objects, smaller means less sent again
        /// for a file that grew.
        #[arg(long, default_value_t = 16)]
        chunk_mib: u64,
        #[arg(long)]
        wait: bool,
    },
    /// Creates collection NAME from a backup (the newest complete one unless
    /// `--backup`), in this cluster or another: same spec, each shard's documents,
    /// vectors and index generation as stored, every chunk checked against its hash.
    /// With `--shards`, NAME is an existing collection whose named shards lost every
    /// copy: they are restored into it from the backup (`--accept-data-loss`: the
    /// writes after the backup's position are given up), each onto an up node.
    Restore {
        #[command(flatten)]
        target: Target,
        url: String,
        #[arg(long = "as")]
        name: String,
        #[arg(long)]
        backup: Option<String>,
        /// Replicas per shard in the new collection (default: the backup's).
        #[arg(long)]
        replication_factor: Option<u32>,
        /// Shards to restore into the existing collection NAME, comma-separated.
        #[arg(long, value_delimiter = ',')]
        shards: Vec<u32>,
        #[arg(long)]
        accept_data_loss: bool,
        #[arg(long)]
        wait: bool,
    },
    /// The repository's backups, oldest first, each with its shards stored.
    List { url: String },
    /// Reads every chunk of one backup (or all) and checks it against its hash; fails
    /// naming each missing or corrupt file.
    Verify {
        url: String,
        #[arg(long)]
        backup: Option<String>,
    },
    /// Keeps the newest N complete backups, deletes the others and every chunk no
    /// remaining backup names (chunks younger than `--grace-secs` stay: a running
    /// backup stores them before the record naming them).
    Prune {
        url: String,
        #[arg(long)]
        keep: usize,
        #[arg(long, default_value_t = 3600)]
        grace_secs: u64,
    },
}

pub async fn run(cmd: BackupCmd) -> anyhow::Result<()> {
    match cmd {
        BackupCmd::Create {
            target,
            collection,
            to,
            id,
            chunk_mib,
            wait,
        } => {
            let backup =
                id.unwrap_or_else(|| format!("{collection}-{}", shoal_node::backup::now_ms()));
            shoal_node::backup::check_id(&backup)?;
            // The CLI opens it too: a URL no node could read fails here first.
            Repository::create(&to)?.init(chunk_mib << 20).await?;
            let mut client = Client::new(target.coordinators);
            let op = client
                .start_backup(cpb::StartBackupRequest {
                    collection: collection.clone(),
                    url: to,
                    backup,
                })
                .await?;
            follow_operation(&mut client, op, &collection, wait).await
        }
        BackupCmd::Restore {
            target,
            url,
            name,
            backup,
            replication_factor,
            shards: only,
            accept_data_loss,
            wait,
        } => {
            let repo = Repository::open(&url)?;
            let backup = match backup {
                Some(b) => b,
                None => repo
                    .list()
                    .await?
                    .into_iter()
                    .rev()
                    .find(|b| b.complete)
                    .map(|b| b.backup)
                    .ok_or_else(|| anyhow::anyhow!("{url} holds no complete backup"))?,
            };
            if !only.is_empty() {
                let (c, shards) = repo.records(&backup, Some(&only)).await?;
                let mut client = Client::new(target.coordinators);
                // The backup must be of a collection laid out as this one.
                let info = client
                    .describe_collection(cpb::DescribeCollectionRequest { name: name.clone() })
                    .await?;
                let have = info.collection.unwrap_or_default();
                if (have.dimension, have.metric, have.shard_count)
                    != (c.dimension, c.metric, c.shard_count)
                {
                    anyhow::bail!(
                        "backup {backup} is of {} ({} dimensions, {} shards); {name} has {} \
                         dimensions and {} shards",
                        c.collection,
                        c.dimension,
                        c.shard_count,
                        have.dimension,
                        have.shard_count
                    );
                }
                let op = client
                    .restore_shards(cpb::RestoreShardsRequest {
                        collection: name.clone(),
                        shards: only,
                        epochs: shards.iter().map(|s| s.epoch.max(1)).collect(),
                        url,
                        backup,
                        accept_data_loss,
                    })
                    .await?;
                return follow_operation(&mut client, op, &name, wait).await;
            }
            // Every shard's record must be there and readable before anything is created.
            let (c, shards) = repo.records(&backup, None).await?;
            let mut client = Client::new(target.coordinators);
            let op = client
                .restore_collection(cpb::RestoreCollectionRequest {
                    collection: Some(c.create_request(&name, replication_factor)),
                    url,
                    backup,
                    epochs: shards.iter().map(|s| s.epoch.max(1)).collect(),
                })
                .await?;
            // The collection's run-time policy as it was backed up.
            if c.auto_rebuild_rows.is_some() || !c.payload_fields.is_empty() {
                client
                    .set_collection_policy(cpb::SetCollectionPolicyRequest {
                        name: name.clone(),
                        auto_rebuild_rows: c.auto_rebuild_rows,
                        payload_fields: c.payload_fields.iter().map(|f| f.wire()).collect(),
                    })
                    .await?;
            }
            follow_operation(&mut client, op, &name, wait).await
        }
        BackupCmd::List { url } => {
            let repo = Repository::open(&url)?;
            print_json(serde_json::json!({
                "url": url,
                "backups": repo.list().await?,
            }));
            Ok(())
        }
        BackupCmd::Verify { url, backup } => {
            let repo = Repository::open(&url)?;
            let report = repo.verify(backup.as_deref()).await?;
            let problems = report.problems.len();
            print_json(serde_json::to_value(&report)?);
            if problems > 0 {
                anyhow::bail!("{problems} problem(s) in {url}");
            }
            Ok(())
        }
        BackupCmd::Prune {
            url,
            keep,
            grace_secs,
        } => {
            if keep == 0 {
                anyhow::bail!("--keep 0 would delete every backup: keep at least 1");
            }
            let repo = Repository::open(&url)?;
            let report = repo.prune(keep, Duration::from_secs(grace_secs)).await?;
            print_json(serde_json::to_value(&report)?);
            Ok(())
        }
    }
}
