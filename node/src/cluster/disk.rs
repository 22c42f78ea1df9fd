//! The data volume's flood stage: a node refuses writes (RESOURCE_EXHAUSTED, as a
//! primary; a backup refuses the batches, so the write is not acknowledged) while its
//! data dir's file system has less free space than `--disk-reserve-bytes`, before the
//! disk fills and a write fails half-way (issue 14). Writes resume by themselves once
//! space is freed.

use std::path::PathBuf;

use crate::cluster::error::ReplicaError;

/// Default reserve: room for a checkpoint of a large write-ahead log and an index
/// build's temporary file on a small volume.
pub const DEFAULT_RESERVE_BYTES: u64 = 256 << 20;

#[derive(Clone, Debug)]
pub struct DiskGuard {
    pub node: String,
    pub dir: PathBuf,
    /// 0 = never refuse.
    pub reserve: u64,
}

impl DiskGuard {
    /// Bytes an unprivileged writer may still use on the data dir's file system.
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        self.usage().map(|(free, _)| free)
    }

    /// (free bytes an unprivileged writer may use, total bytes) of the data dir's file
    /// system: reported with the heartbeats for placement's disk watermarks.
    pub fn usage(&self) -> std::io::Result<(u64, u64)> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.dir.as_os_str().as_bytes())
            .map_err(std::io::Error::other)?;
        // SAFETY: statvfs(3) with a NUL-terminated path and a zeroed out-parameter.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let frsize = st.f_frsize as u64;
        Ok((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
    }

    /// Ok while the volume has more free space than the reserve (or when it cannot be
    /// read: the write itself then reports the disk's error).
    pub fn check(&self) -> Result<(), ReplicaError> {
        if self.reserve == 0 {
            return Ok(());
        }
        match self.free_bytes() {
            Ok(free) if free < self.reserve => {
                metrics::counter!("shoal_writes_refused_disk_total").increment(1);
                Err(ReplicaError::DiskFull(format!(
                    "node {}: its data volume ({}) has {free} bytes free, under the limit \
                     disk_reserve_bytes = {}; writes resume once space is freed",
                    self.node,
                    self.dir.display(),
                    self.reserve
                )))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_refused_under_the_reserve_and_resume_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = DiskGuard {
            node: "n1".into(),
            dir: dir.path().to_path_buf(),
            reserve: 0,
        };
        let free = g.free_bytes().unwrap();
        assert!(free > 0);
        assert!(g.check().is_ok());
        g.reserve = free.saturating_mul(2).max(1 << 40);
        let e = g.check().unwrap_err();
        assert!(matches!(e, ReplicaError::DiskFull(_)), "{e:?}");
        assert!(e.message().contains("disk_reserve_bytes"), "{e:?}");
        g.reserve = 1;
        assert!(g.check().is_ok());
    }
}
