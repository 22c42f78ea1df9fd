//! The FAISS boundary: everything that touches the `faiss` crate lives here, so the
//! rest of the shard works with plain slices and row numbers.

use std::path::Path;

use faiss::index::IndexImpl;
use faiss::{Idx, Index};

use super::config::{IvfPqParams, Metric};
use super::error::{Result, ShardError};

unsafe extern "C" {
    // libgomp, linked by faiss-sys. The setting is per calling thread: a build thread
    // can use a team while search threads stay single-threaded.
    fn omp_set_num_threads(n: std::ffi::c_int);
}

/// Sets how many OpenMP threads FAISS calls made from this thread may use.
pub fn set_thread_omp_threads(n: usize) {
    single_threaded_blas();
    // SAFETY: plain libgomp call that writes the calling thread's ICV.
    unsafe { omp_set_num_threads(n.max(1) as std::ffi::c_int) }
}

/// FAISS parallelises with OpenMP and calls BLAS from inside its parallel regions;
/// Debian's default OpenBLAS (pthreads) then starts its own thread team on the same
/// cores. On 2 cores that made IVF-PQ training 2.7x slower (IVF256,PQ98 on
/// Fashion-MNIST: 134 s vs 48.6 s, sys time 84 s vs 0.6 s), so BLAS runs on the
/// calling thread only. Looked up at run time: absent when another BLAS is installed.
fn single_threaded_blas() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: dlsym with a NUL-terminated name; the symbol, if present, has the
        // signature `void openblas_set_num_threads(int)`.
        unsafe {
            let sym = libc::dlsym(libc::RTLD_DEFAULT, c"openblas_set_num_threads".as_ptr());
            if !sym.is_null() {
                let f: extern "C" fn(std::ffi::c_int) = std::mem::transmute(sym);
                f(1);
                tracing::debug!("openblas limited to one thread per caller");
            }
        }
    });
}

thread_local! {
    static SEARCH_THREAD_READY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// FAISS runs single-threaded on search threads: see `CollectionConfig::build_threads`.
fn ensure_single_threaded_search() {
    SEARCH_THREAD_READY.with(|ready| {
        if !ready.get() {
            single_threaded_blas();
            set_thread_omp_threads(1);
            ready.set(true);
        }
    });
}

/// Searches a FAISS index through a shared reference. FAISS's CPU indexes are safe to
/// search concurrently (search is `const` in C++); the `faiss` crate only offers
/// `&mut self` search for most index types, so we call the C API directly.
/// `nprobe` applies to IVF indexes, through per-call search parameters.
pub fn search_shared(
    index: &IndexImpl,
    queries: &[f32],
    k: usize,
    nprobe: Option<usize>,
) -> Result<(Vec<f32>, Vec<Idx>)> {
    search_with(index, queries, k, nprobe, None)
}

/// Per-call IVF search parameters, optionally restricted to the ids set in a dense
/// bitmap (FAISS's `IDSelectorBitmap`, which reads the bitmap without copying it: it
/// must outlive the search). Freed on drop; the `faiss` crate's own constructor leaks
/// the selector.
struct IvfParams<'a> {
    params: *mut faiss_sys::FaissSearchParametersIVF,
    selector: *mut faiss_sys::FaissIDSelectorBitmap,
    _bitmap: std::marker::PhantomData<&'a [u8]>,
}

impl<'a> IvfParams<'a> {
    fn new(nprobe: usize, bitmap: Option<&'a [u8]>) -> Result<Self> {
        let mut p = IvfParams {
            params: std::ptr::null_mut(),
            selector: std::ptr::null_mut(),
            _bitmap: std::marker::PhantomData,
        };
        // SAFETY: out-pointers to fresh objects; the bitmap's length is passed in bytes
        // as `IDSelectorBitmap(n, bitmap)` takes it, and it outlives `p` ('a).
        unsafe {
            if let Some(b) = bitmap {
                if faiss_sys::faiss_IDSelectorBitmap_new(&mut p.selector, b.len(), b.as_ptr()) != 0
                {
                    return Err(ShardError::Faiss(last_error()));
                }
            }
            if faiss_sys::faiss_SearchParametersIVF_new_with(
                &mut p.params,
                p.selector.cast(),
                nprobe,
                0,
            ) != 0
            {
                return Err(ShardError::Faiss(last_error()));
            }
        }
        Ok(p)
    }
}

impl Drop for IvfParams<'_> {
    fn drop(&mut self) {
        // SAFETY: each pointer is null or an object made in `new` and freed once here;
        // the parameters do not own the selector.
        unsafe {
            if !self.params.is_null() {
                faiss_sys::faiss_SearchParametersIVF_free(self.params);
            }
            if !self.selector.is_null() {
                faiss_sys::faiss_IDSelectorBitmap_free(self.selector);
            }
        }
    }
}

fn search_with(
    index: &IndexImpl,
    queries: &[f32],
    k: usize,
    nprobe: Option<usize>,
    selected: Option<&[u8]>,
) -> Result<(Vec<f32>, Vec<Idx>)> {
    ensure_single_threaded_search();
    let d = index.d() as usize;
    assert_eq!(queries.len() % d, 0, "query buffer is not a multiple of d");
    let nq = queries.len() / d;
    let mut distances = vec![0f32; nq * k];
    let mut labels = vec![Idx::none(); nq * k];
    let params = match (nprobe, selected) {
        (None, None) => None,
        (nprobe, selected) => Some(IvfParams::new(nprobe.unwrap_or(1), selected)?),
    };
    let params_ptr = params
        .as_ref()
        .map_or(std::ptr::null(), |p| p.params as *const _);
    // SAFETY: buffers are sized nq * k and nq * d as FAISS expects; the index pointer is
    // valid for the borrow; concurrent const searches are thread-safe in FAISS.
    let rc = unsafe {
        faiss_sys::faiss_Index_search_with_params(
            index.inner_ptr(),
            nq as faiss_sys::idx_t,
            queries.as_ptr(),
            k as faiss_sys::idx_t,
            params_ptr,
            distances.as_mut_ptr(),
            labels.as_mut_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(ShardError::Faiss(last_error()));
    }
    Ok((distances, labels))
}

fn last_error() -> String {
    // SAFETY: FAISS returns a thread-local NUL-terminated message or null.
    unsafe {
        let p = faiss_sys::faiss_get_last_error();
        if p.is_null() {
            "unknown faiss error".into()
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// An IVF-PQ index whose ids are shard row numbers.
pub struct AnnIndex {
    inner: IndexImpl,
}

impl AnnIndex {
    /// Trains a new index on `sample` (row-major, `dim` wide).
    pub fn train(dim: usize, metric: Metric, params: IvfPqParams, sample: &[f32]) -> Result<Self> {
        let n = sample.len() / dim;
        // k-means needs at least one point per centroid, for the coarse lists and for
        // each PQ codebook.
        let need = params.nlist.max(1 << params.nbits);
        if n < need {
            return Err(ShardError::NotEnoughVectors { have: n, need });
        }
        let mut inner =
            faiss::index_factory(dim as u32, params.factory_string(), faiss_metric(metric))?;
        inner.train(sample)?;
        Ok(Self { inner })
    }

    pub fn add(&mut self, vectors: &[f32], rows: &[u64]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let ids: Vec<Idx> = rows.iter().map(|&r| Idx::new(r)).collect();
        self.inner.add_with_ids(vectors, &ids)?;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.inner.ntotal()
    }

    pub fn dim(&self) -> usize {
        self.inner.d() as usize
    }

    /// Top `k` rows by approximate (PQ) distance, best first, among the labels set in
    /// `selected` when given (a dense bitmap, bit
    /// `label % 8` of byte `label / 8`).
    pub fn search_selected(
        &self,
        query: &[f32],
        k: usize,
        nprobe: usize,
        selected: Option<&[u8]>,
    ) -> Result<Vec<(u64, f32)>> {
        let (d, l) = search_with(&self.inner, query, k, Some(nprobe), selected)?;
        Ok(l.iter()
            .zip(d)
            .filter_map(|(l, d)| l.get().map(|r| (r, d)))
            .collect())
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let p = path
            .to_str()
            .ok_or_else(|| ShardError::Faiss(format!("non-utf8 path {path:?}")))?;
        faiss::write_index(&self.inner, p)?;
        Ok(())
    }

    /// Reads an index file. The caller has verified the file's checksum: FAISS may
    /// crash rather than fail on a damaged file.
    pub fn read_verified(path: &Path) -> Result<Self> {
        let p = path
            .to_str()
            .ok_or_else(|| ShardError::Faiss(format!("non-utf8 path {path:?}")))?;
        let inner = faiss::read_index(p)?;
        Ok(Self { inner })
    }
}

/// FAISS's name for a metric.
fn faiss_metric(m: Metric) -> faiss::MetricType {
    match m {
        Metric::L2 => faiss::MetricType::L2,
        Metric::InnerProduct => faiss::MetricType::InnerProduct,
    }
}

/// FAISS's own codes for `vectors` from a standalone codec (`factory`: "SQ8",
/// "SQfp16") trained on `sample`: the reference the re-ranking copy's codecs are
/// checked against (`rerank.rs`).
#[cfg(test)]
pub fn faiss_sa_encode(dim: usize, factory: &str, sample: &[f32], vectors: &[f32]) -> Vec<u8> {
    let mut index = faiss::index_factory(dim as u32, factory, faiss::MetricType::L2).unwrap();
    index.train(sample).unwrap();
    let mut size = 0usize;
    // SAFETY: valid index pointer; `size` is written by FAISS.
    assert_eq!(
        unsafe { faiss_sys::faiss_Index_sa_code_size(index.inner_ptr(), &mut size) },
        0
    );
    let n = vectors.len() / dim;
    let mut codes = vec![0u8; n * size];
    // SAFETY: `vectors` holds n * d floats and `codes` n * sa_code_size bytes.
    let rc = unsafe {
        faiss_sys::faiss_Index_sa_encode(
            index.inner_ptr(),
            n as faiss_sys::idx_t,
            vectors.as_ptr(),
            codes.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "{}", last_error());
    codes
}
