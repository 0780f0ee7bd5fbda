//! glibc's allocator options (`mallopt(3)`). By default glibc serves each allocation above its
//! mmap threshold from a fresh `mmap` and unmaps it on `free`, and it returns the top of its heap
//! to the kernel as soon as more than its trim threshold is free there. Processes that stream
//! output allocate and free megabyte buffers many times a second; with the defaults every one is
//! page-faulted in again. And each thread that allocates while another holds the main arena's
//! lock gets an arena of its own (up to 8 per core), whose free memory stays resident: in the
//! agent the output reader and the file worker threads. The caller picks the values (the agent
//! measured them).
//!
//! The trim threshold that keeps those buffers also keeps up to that much free heap resident once
//! the streaming is over; [`trim_malloc`] (`malloc_trim(3)`) gives it back, for a caller that knows
//! it is idle.
//!
//! This is here, not in Python through `ctypes`, because loading `ctypes` costs an agent ~0.45 MiB
//! of resident memory for one call.
#![allow(unsafe_code)]

/// Sets glibc's `M_MMAP_THRESHOLD`, `M_TRIM_THRESHOLD` and `M_TOP_PAD` (bytes) and `M_ARENA_MAX`
/// (0 keeps glibc's default) for the whole process. `M_ARENA_MAX` counts only while no second
/// thread has allocated yet (glibc fixes the limit then): call it first thing. Returns whether every
/// value was accepted; on a C library other than glibc nothing is changed and it returns `false`.
pub fn tune_malloc(
    mmap_threshold: usize,
    trim_threshold: usize,
    top_pad: usize,
    arena_max: usize,
) -> bool {
    #[cfg(target_env = "gnu")]
    {
        let set = |option: libc::c_int, value: usize| -> bool {
            let Ok(value) = libc::c_int::try_from(value) else {
                return false;
            };
            // SAFETY: mallopt only records an allocator parameter; it validates the option and
            // value itself (returning 0 for one it refuses) and touches no memory of ours.
            unsafe { libc::mallopt(option, value) == 1 }
        };
        let mmap = set(libc::M_MMAP_THRESHOLD, mmap_threshold);
        let trim = set(libc::M_TRIM_THRESHOLD, trim_threshold);
        let pad = set(libc::M_TOP_PAD, top_pad);
        let arenas = arena_max == 0 || set(libc::M_ARENA_MAX, arena_max);
        mmap && trim && pad && arenas
    }
    #[cfg(not(target_env = "gnu"))]
    {
        let _ = (mmap_threshold, trim_threshold, top_pad, arena_max);
        false
    }
}

/// Returns the free memory of every arena to the kernel (`malloc_trim(0)`: the heap's top and the
/// free pages inside it, by `madvise`), whatever the trim threshold. Whether any memory was
/// released; `false` on a C library other than glibc. It walks every free chunk under the arenas'
/// locks: for a process that has gone idle, never on a hot path.
pub fn trim_malloc() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim only hands free allocator pages back to the kernel, under the
        // allocator's own locks; it touches no memory that is allocated.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn glibc_accepts_the_agents_values_and_a_value_past_c_int_is_refused() {
        assert!(super::tune_malloc(8 << 20, 64 << 20, 16 << 20, 0));
        assert!(!super::tune_malloc(usize::MAX, 64 << 20, 16 << 20, 0));
        assert!(!super::tune_malloc(8 << 20, 64 << 20, 16 << 20, usize::MAX));
        assert!(super::tune_malloc(128 << 10, 128 << 10, 128 << 10, 0)); // glibc's defaults again
    }

    #[test]
    fn trimming_returns_freed_heap_memory() {
        // Many small blocks (below any mmap threshold, so from the heap), then all but the last
        // freed: the last keeps the heap's top in place, so only a trim of the pages inside the
        // heap can release the rest.
        let blocks: Vec<Vec<u8>> = (0..4096).map(|i| vec![i as u8; 4000]).collect();
        let keep = vec![1u8; 4000];
        drop(blocks);
        assert!(super::trim_malloc());
        assert_eq!(keep[0], 1);
    }
}
