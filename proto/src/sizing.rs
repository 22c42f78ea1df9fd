//! Index sizing (issue 18): the one rule for how many IVF lists and how large a training
//! sample a shard of n vectors gets when its collection does not say. The coordinator
//! sizes a cluster build with it (the same for every shard); a node sizes a shard's own
//! automatic rebuilds with it until a cluster build has chosen.

/// IVF parameters for shards of `rows` vectors, as FAISS advises: about 4·√n lists
/// (a power of two, for the quantizer's balance), each trained on at least 39 vectors
/// (so never more lists than n / 39), and a training sample of at least 39 per list
/// (at most the shard, at least `min_sample` when the shard has that many).
pub fn size_index(rows: u64, min_sample: u64) -> (u32, u64) {
    let target = (4.0 * (rows as f64).sqrt()).max(1.0);
    // The power of two nearest 4·√n.
    let mut nlist: u64 = 1;
    while (nlist * 2) as f64 <= target * std::f64::consts::SQRT_2 {
        nlist *= 2;
    }
    let nlist = nlist.min((rows / 39).max(1)).min(1 << 20);
    let sample = (39 * nlist).max(min_sample).min(rows.max(39 * nlist));
    (nlist as u32, sample)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_sizes_follow_the_faiss_rule() {
        // (rows, nlist, sample): 4·√n as a power of two, never more than n / 39 lists,
        // a sample of at least 39 per list.
        for (rows, nlist, sample) in [
            (0, 1, 39),
            (100, 2, 78),
            (10_000, 256, 9_984),
            (1_000_000, 4096, 159_744),
            (3_333_333, 8192, 319_488),
        ] {
            let (n, s) = size_index(rows, 0);
            assert_eq!((rows, n, s), (rows, nlist, sample));
            assert!(s >= 39 * n as u64);
            assert!(n as u64 <= (rows / 39).max(1));
        }
        // A larger floor on the sample holds, up to the shard's size.
        assert_eq!(size_index(1_000_000, 65_536 * 4).1, 262_144);
    }
}
