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

/// Passes of [`hold_free_chunks`] at most: a pass that takes a chunk from a large bin splits it, and
/// the remainder is a free chunk the next pass takes.
const HOLD_PASSES: usize = 8;

/// The largest free chunk [`hold_free_chunks`] takes: glibc's first mmap threshold (it only rises
/// from there). A request this large may be served by a fresh `mmap` instead of the chunk, which
/// would stay free while the request added memory; one such chunk is one place, not a scatter.
const HOLD_MAX_CHUNK: usize = 128 << 10;

/// The bytes of the report buffer [`hold_free_chunks`] has `malloc_info(3)` write into (mapped, not
/// allocated, so that reading the report leaves no free chunk behind): a heap has at most ~130
/// bins, one line of ~70 bytes each.
const REPORT_BYTES: usize = 1 << 20;

/// Takes every free chunk of the calling thread's heap (glibc's main arena: call it from the main
/// thread), so that later allocations are carved from the heap's top instead; the chunks are never
/// given back. Returns the bytes now held (0 on a C library other than glibc).
///
/// For a process that forks many children which allocate (the zygote): its free chunks are
/// scattered through its heap, and in a child every `malloc` served from a bin writes that chunk's
/// header and its bin neighbours' links, each on its own page shared with the parent: a copy-on-
/// write fault per page, ~3 per allocation. Taken by the parent first, the children's allocations
/// come from the top, a few contiguous pages. Measured on the zygote after its preload: 840 free
/// chunks, 355 kB in a 13.8 MB heap; a sandbox's "A" then took ~680 page faults, ~420 with them
/// held (`docs/benchmarks.md`, `cold10`). It costs no memory: the chunks' pages are resident
/// already, and only stop being reused.
pub fn hold_free_chunks() -> usize {
    #[cfg(target_env = "gnu")]
    {
        let mut held = 0;
        let mut left = usize::MAX;
        for _ in 0..HOLD_PASSES {
            let Some(FreeChunks { chunks, free }) = malloc_report(main_heap_free_chunks) else {
                return held;
            };
            // A pass that did not shrink what is free (chunks some malloc cannot reach) stops,
            // rather than carving the top for nothing. `free` is the bins' own totals: a large
            // bin's smallest size times its count undercounts its bigger chunks, and a pass that
            // split them (their remainders listed at their own sizes next time) looked like one
            // that freed more, and stopped with ~80 kB still free (CI57).
            if free == 0 || free >= left {
                return held;
            }
            left = free;
            for (size, count) in chunks {
                // The request whose chunk is exactly `size`: glibc adds 8 bytes of header and
                // rounds up to 16 (32 at least).
                let request = size.saturating_sub(8).max(1);
                for _ in 0..count {
                    // SAFETY: a plain allocation, deliberately never freed.
                    let chunk = unsafe { libc::malloc(request) }.cast::<u8>();
                    if chunk.is_null() {
                        return held;
                    }
                    // A write the compiler must keep: an allocation nothing uses is otherwise
                    // elided (LLVM knows `malloc`), and the chunk would stay free. Its page holds
                    // the chunk's links already: nothing is made resident.
                    // SAFETY: the first of `request` (>= 1) bytes just allocated to us.
                    unsafe { chunk.write_volatile(0) };
                    held += size;
                }
            }
        }
        held
    }
    #[cfg(not(target_env = "gnu"))]
    {
        0
    }
}

/// `read` of `malloc_info(3)`'s XML report, written unbuffered into a mapped buffer and read there:
/// stdio's own buffer, or a copy of the report, would be allocated, then freed, leaving a free chunk
/// behind the very call that counts them.
#[cfg(target_env = "gnu")]
fn malloc_report<T>(read: impl FnOnce(&str) -> T) -> Option<T> {
    // SAFETY: a fresh private anonymous mapping, unmapped below; fmemopen writes only inside it
    // (REPORT_BYTES, with room for its final NUL), and the stream is closed before it is read.
    unsafe {
        let buffer = libc::mmap(
            std::ptr::null_mut(),
            REPORT_BYTES,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if buffer == libc::MAP_FAILED {
            return None;
        }
        let stream = libc::fmemopen(buffer, REPORT_BYTES, c"w".as_ptr());
        let mut report = None;
        if !stream.is_null() {
            let unbuffered = libc::setvbuf(stream, std::ptr::null_mut(), libc::_IONBF, 0) == 0;
            let written = unbuffered && libc::malloc_info(0, stream) == 0;
            libc::fclose(stream);
            if written {
                let text = std::ffi::CStr::from_ptr(buffer.cast::<libc::c_char>());
                report = text.to_str().ok().map(read);
            }
        }
        libc::munmap(buffer, REPORT_BYTES);
        report
    }
}

/// What [`main_heap_free_chunks`] reads from a `malloc_info` report.
#[derive(Debug, Default, PartialEq, Eq)]
struct FreeChunks {
    /// (chunk bytes, count): each bin's smallest size and its count (a large bin's bigger chunks
    /// are split by the allocations of its smallest, and taken by the next pass), the unsorted
    /// ones likewise.
    chunks: Vec<(usize, usize)>,
    /// The bytes free in those bins, from their own totals.
    free: usize,
}

/// The free chunks of the main heap (`<heap nr="0">`) in a `malloc_info` report; none of
/// [`HOLD_MAX_CHUNK`] or more. glibc prints a chunk's size with its flag bits (33 for a 32-byte
/// chunk), hence the mask.
fn main_heap_free_chunks(report: &str) -> FreeChunks {
    let Some(start) = report.find("<heap nr=\"0\">") else {
        return FreeChunks::default();
    };
    let heap = &report[start..];
    let heap = &heap[..heap.find("</heap>").unwrap_or(heap.len())];
    let attribute = |line: &str, name: &str| -> Option<usize> {
        let at = line.find(name)? + name.len();
        line[at..].split('"').next()?.parse().ok()
    };
    let mut found = FreeChunks::default();
    let bins = heap
        .lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with("<size ") || line.starts_with("<unsorted "))
        .filter_map(|line| {
            Some((
                attribute(line, " from=\"")? & !7,
                attribute(line, " count=\"")?,
                attribute(line, " total=\"")?,
            ))
        })
        .filter(|&(size, count, _)| (32..HOLD_MAX_CHUNK).contains(&size) && count > 0);
    for (size, count, total) in bins {
        found.chunks.push((size, count));
        found.free += total;
    }
    found
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
    fn a_reports_free_chunks_are_read_from_the_main_heap_only() {
        let report = r#"<malloc version="1">
<heap nr="0">
<sizes>
  <size from="33" to="33" total="1089" count="33"/>
  <size from="1041" to="1249" total="4576" count="4"/>
  <size from="262145" to="262145" total="262145" count="1"/>
  <unsorted from="71409" to="71409" total="71409" count="1"/>
</sizes>
<total type="fast" count="0" size="0"/>
<total type="rest" count="38" size="77074"/>
</heap>
<heap nr="1">
<sizes>
  <size from="49" to="49" total="490" count="10"/>
</sizes>
</heap>
<total type="rest" count="48" size="77564"/>
</malloc>
"#;
        assert_eq!(
            super::main_heap_free_chunks(report),
            super::FreeChunks {
                chunks: vec![(32, 33), (1040, 4), (71408, 1)],
                free: 1089 + 4576 + 71409,
            }
        );
        assert_eq!(
            super::main_heap_free_chunks("<malloc/>"),
            super::FreeChunks::default()
        );
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
