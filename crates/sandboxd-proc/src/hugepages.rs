//! A process's anonymous memory gathered into transparent huge pages (`madvise(MADV_COLLAPSE)`,
//! Linux 6.1), for a process that is about to be forked many times: the zygote.
//!
//! `fork` copies the parent's page tables entry by entry: for the zygote's ~46 MiB of anonymous
//! memory, ~11,600 entries on every cold create (the zygote's fork of "A", the one page-table copy
//! a create makes), each entry's page made copy-on-write. A 2 MiB range mapped by one huge page is
//! copied as one entry instead of 512. A child that then writes into such a range gets its entry
//! split back into 512 (mapping the same pages) and copies the 4 KiB page it wrote, as before;
//! ranges it never writes cost nothing more. The zygote's own writes while a child shares a range
//! split its entry too, but the range stays one large folio, and a fork copies the entries of a
//! large folio in batches (Linux 6.9+): cheaper than 512 separate pages still. The memory is the same
//! pages with the same contents: nothing a child sees changes, only how its page tables hold them.
//!
//! Only `collapse` is asked for, not `MADV_HUGEPAGE`: the ranges are not marked, so later faults in
//! the zygote or its children (a sandbox's own allocations) still get 4 KiB pages, and a sandbox's
//! memory does not grow by the holes of 2 MiB pages. (`MADV_COLLAPSE` ignores the system's
//! `enabled` setting but `never`, and needs no `khugepaged`.)
//!
//! This is here, not in Python through `ctypes`, because loading `ctypes` would put its module and
//! library into the very memory every fork copies (see `malloc`).
#![allow(unsafe_code)]

use std::fs;

/// The size of a PMD-mapped transparent huge page on the architectures this runs on (x86-64,
/// arm64 with 4 KiB pages).
pub const HUGE_PAGE_BYTES: usize = 2 << 20;

/// Collapses every whole, 2 MiB-aligned range of this process's private, writable, anonymous
/// mappings (the `brk` heap and unnamed `mmap`s: Python's object arenas, `malloc`'s) into huge
/// pages, one `madvise(MADV_COLLAPSE)` per range so that one the kernel cannot collapse (no free
/// huge page: `EAGAIN`/`ENOMEM`) does not stop the others. Returns the bytes collapsed. 0 when the
/// kernel has no `MADV_COLLAPSE` (before 6.1: `EINVAL`), transparent huge pages are turned off
/// (`never`), or on a C library other than glibc: the process then works as before. Costs 35-100 ms
/// for the zygote's ~25 MiB (each range copied into a new huge page, which the kernel may compact
/// memory to find): for a process once, before it forks.
pub fn collapse_anonymous() -> usize {
    #[cfg(target_env = "gnu")]
    {
        let Ok(maps) = fs::read_to_string("/proc/self/maps") else {
            return 0;
        };
        collapse_ranges(anonymous_ranges(&maps))
    }
    #[cfg(not(target_env = "gnu"))]
    {
        0
    }
}

/// Map this process's huge pages by 4 KiB entries again, keeping the huge pages themselves (large
/// folios), once after [`collapse_anonymous`]: for a parent whose forks should copy a large folio's
/// entries in batches but not inherit 2 MiB entries. A child's first write into a range it holds
/// by one 2 MiB entry splits that entry (`__split_huge_pmd`, in the child) before its 4 KiB copy;
/// the zygote's own writes used to split its entries within its first create, so its forks held
/// few, until its serve loop stopped writing (Rust since `cold15`): then every fork held ~13 and
/// split them on its first writes (measured in a burst of 100: "A"'s CPU 3.9 → 4.7 ms a create;
/// split here once, 4.0, and the zygote's own CPU lower still). How: an `mprotect` of a range's
/// first page to read-only and back, which the kernel can only do on 4 KiB entries; nothing else
/// of the mapping changes. Returns the 2 MiB-aligned ranges gone through (every whole one in the
/// mappings [`collapse_anonymous`] takes, huge or not: on a range of 4 KiB pages it is a no-op).
pub fn split_huge_mappings() -> usize {
    #[cfg(target_env = "gnu")]
    {
        let Ok(maps) = fs::read_to_string("/proc/self/maps") else {
            return 0;
        };
        let mut ranges = 0;
        for (start, end) in anonymous_ranges(&maps) {
            let mut at = start.next_multiple_of(HUGE_PAGE_BYTES);
            while at.saturating_add(HUGE_PAGE_BYTES) <= end {
                // SAFETY: `at` is a page of a private `rw-p` anonymous mapping of ours, made
                // read-only and then `rw` again, as it was; the caller runs no other thread that
                // could write the page meanwhile (the zygote is single-threaded).
                unsafe {
                    let page = at as *mut libc::c_void;
                    if libc::mprotect(page, 4096, libc::PROT_READ) == 0 {
                        libc::mprotect(page, 4096, libc::PROT_READ | libc::PROT_WRITE);
                    }
                }
                ranges += 1;
                at += HUGE_PAGE_BYTES;
            }
        }
        ranges
    }
    #[cfg(not(target_env = "gnu"))]
    {
        0
    }
}

/// [`collapse_anonymous`]'s work on the given (start, end) ranges of mappings of ours.
#[cfg(target_env = "gnu")]
fn collapse_ranges(ranges: impl Iterator<Item = (usize, usize)>) -> usize {
    let mut collapsed = 0;
    for (start, end) in ranges {
        let mut at = start.next_multiple_of(HUGE_PAGE_BYTES);
        while at.saturating_add(HUGE_PAGE_BYTES) <= end {
            // SAFETY: `at..at + 2 MiB` lies inside a mapping of ours; MADV_COLLAPSE copies its
            // pages into a huge page and maps that in their place, with the same contents, or
            // fails and leaves the range as it was. It changes no byte we can observe.
            let done = unsafe {
                libc::madvise(
                    at as *mut libc::c_void,
                    HUGE_PAGE_BYTES,
                    libc::MADV_COLLAPSE,
                )
            } == 0;
            if done {
                collapsed += HUGE_PAGE_BYTES;
            } else if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                // Not supported here (an older kernel, THP off): every range would say so.
                return collapsed;
            }
            at += HUGE_PAGE_BYTES;
        }
    }
    collapsed
}

/// The private, writable, anonymous mappings of a `/proc/<pid>/maps` text, as (start, end): no
/// file (inode 0), and no name but `[heap]` (not the stack, whose guard gap a huge page could
/// cross, nor the kernel's `[vvar]`/`[vdso]`, nor a named `[anon:…]` region someone set apart).
fn anonymous_ranges(maps: &str) -> impl Iterator<Item = (usize, usize)> + '_ {
    maps.lines().filter_map(|line| {
        let mut fields = line.split_ascii_whitespace();
        let range = fields.next()?;
        let perms = fields.next()?;
        let _offset = fields.next()?;
        let _device = fields.next()?;
        let inode = fields.next()?;
        let name = fields.next();
        if perms != "rw-p" || inode != "0" || !matches!(name, None | Some("[heap]")) {
            return None;
        }
        let (start, end) = range.split_once('-')?;
        Some((
            usize::from_str_radix(start, 16).ok()?,
            usize::from_str_radix(end, 16).ok()?,
        ))
    })
}

#[cfg(test)]
mod tests {
    #[cfg(target_env = "gnu")]
    use super::collapse_ranges;
    use super::{HUGE_PAGE_BYTES, anonymous_ranges};

    #[test]
    fn only_private_writable_anonymous_mappings_and_the_heap_are_taken() {
        let maps = "\
55e0239f4000-55e02471f000 rw-p 00000000 00:00 0                          [heap]
7eff86ff3000-7eff877f3000 rw-p 00000000 00:00 0 
7eff877f3000-7eff877f4000 rw-p 00000000 00:00 0
7eff80000000-7eff80400000 rw-s 00000000 00:01 1234                       /dev/zero (deleted)
7eff81000000-7eff81400000 rw-p 00443000 fe:00 18710                      /usr/lib/libpython3.11.so
7eff82000000-7eff82400000 r--p 00000000 00:00 0
7eff83000000-7eff83400000 rw-p 00000000 00:00 0                          [anon:kept]
7ffc12000000-7ffc12400000 rw-p 00000000 00:00 0                          [stack]
";
        let ranges: Vec<_> = anonymous_ranges(maps).collect();
        assert_eq!(
            ranges,
            vec![
                (0x55e0_239f_4000, 0x55e0_2471_f000),
                (0x7eff_86ff_3000, 0x7eff_877f_3000),
                (0x7eff_877f_3000, 0x7eff_877f_4000),
            ]
        );
    }

    /// The `AnonHugePages` of the mapping that holds `address`, in KiB, from `/proc/self/smaps`.
    fn anon_huge_kib(address: usize) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            let first = line.split_ascii_whitespace().next().unwrap_or("");
            if let Some((start, end)) = first.split_once('-')
                && let (Ok(start), Ok(end)) = (
                    usize::from_str_radix(start, 16),
                    usize::from_str_radix(end, 16),
                )
            {
                inside = start <= address && address < end;
            } else if inside && first == "AnonHugePages:" {
                return line
                    .split_ascii_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse()
                    .unwrap();
            }
        }
        panic!("no mapping holds {address:#x}");
    }

    #[cfg(target_env = "gnu")]
    #[test]
    fn written_anonymous_memory_is_collapsed_with_its_contents_and_a_fork_sees_them() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if thp.is_empty() || thp.contains("[never]") {
            eprintln!("skipped: transparent huge pages are off here");
            return;
        }
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut version = release
            .split(|c: char| !c.is_ascii_digit())
            .map(|n| n.parse::<u32>().unwrap_or(0));
        if (version.next().unwrap_or(0), version.next().unwrap_or(0)) < (6, 1) {
            eprintln!(
                "skipped: no MADV_COLLAPSE before Linux 6.1 ({})",
                release.trim()
            );
            return;
        }
        // 3 huge pages' worth, so that at least one aligned 2 MiB range lies inside, written with
        // 4 KiB pages (never marked MADV_HUGEPAGE: only the collapse may make a huge page).
        let length = 3 * HUGE_PAGE_BYTES;
        // SAFETY: a fresh private anonymous mapping of our own, unmapped below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                length,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        // SAFETY: the mapping is ours, `length` bytes long, and written only here.
        let memory = unsafe { std::slice::from_raw_parts_mut(base.cast::<u8>(), length) };
        for (i, byte) in memory.iter_mut().enumerate() {
            *byte = (i % 251) as u8;
        }
        let aligned = (base as usize).next_multiple_of(HUGE_PAGE_BYTES);
        assert_eq!(anon_huge_kib(aligned), 0, "4 KiB pages before");

        // Its own mapping only: the whole process's (collapse_anonymous) would meet the other
        // tests' threads' malloc arenas changing meanwhile, whose EINVAL ends the collapse early
        // (the zygote, which uses it, has one thread then).
        let collapsed = collapse_ranges(std::iter::once((base as usize, base as usize + length)));

        assert!(collapsed >= HUGE_PAGE_BYTES, "collapsed {collapsed} bytes");
        assert!(anon_huge_kib(aligned) >= 2048, "a huge page after");
        assert!(
            memory
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8)
        );
        // SAFETY: fork in a test thread: the child only reads its copy and exits.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let same = memory
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8);
            // SAFETY: the child's own exit, no unwinding into the test harness.
            unsafe { libc::_exit(if same { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        assert_eq!(unsafe { libc::waitpid(child, &raw mut status, 0) }, child);
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        // SAFETY: the mapping made above, no longer borrowed.
        assert_eq!(unsafe { libc::munmap(base, length) }, 0);
    }
}
