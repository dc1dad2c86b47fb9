//! The global allocator: glibc's malloc for ordinary blocks, jemalloc for over-aligned ones.
//!
//! An idle connection is mostly two blocks that tokio aligns to 128 bytes (its task cell, 512 bytes with
//! the idle connection's future, and its I/O registration, 256): both are cache-padded so that threads do not
//! share their cache lines. glibc serves such a request by carving an aligned block out of a larger one and
//! keeps the slivers on either side, which nothing of that size reuses: at 10,000 idle connections, malloc's
//! own count (`malloc_stats`) was 952 bytes in use per connection and about 170 more free between blocks
//! (1,166 bytes of RSS per connection in all). jemalloc keeps blocks of one size class in runs that start on
//! a page, so a 512- or 256-byte block is aligned to 128 by its place and costs its size, with no header:
//! 953 bytes per connection (mimalloc in the same place measured 1,056: it pads an aligned block to the
//! next size class).
//!
//! Everything else stays with glibc, on purpose: its `malloc_trim` gives back what a peak of large bodies
//! left behind (`spill`, and the README's "Memory after a peak", where jemalloc as the only allocator kept
//! 439 MiB of 771 after 100 slow readers). The choice depends only on a block's alignment, which Rust passes
//! unchanged to `dealloc` and `realloc`, so a block always goes back to the allocator that gave it. What
//! jemalloc holds after a peak of connections is purged with glibc's trim (`memory::trim_heap`).

use std::alloc::{GlobalAlloc, Layout, System};

use tikv_jemallocator::Jemalloc;

/// Alignments above this go to jemalloc; glibc's `malloc` aligns every block to 16 bytes by itself.
const MALLOC_ALIGN: usize = 16;

/// Install with `#[global_allocator]` (done in the binary's `main.rs`).
pub struct Allocator;

// SAFETY: each method forwards the caller's arguments unchanged to one of two sound allocators, chosen by
// `layout.align()` alone. Rust requires `dealloc` and `realloc` to be called with the layout (hence the
// alignment) the block was allocated with, so every block is freed or resized by the allocator that gave it.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() > MALLOC_ALIGN {
            // SAFETY: the caller's contract (non-zero size) is passed on unchanged.
            unsafe { Jemalloc.alloc(layout) }
        } else {
            // SAFETY: as above.
            unsafe { System.alloc(layout) }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.align() > MALLOC_ALIGN {
            // SAFETY: as in `alloc`.
            unsafe { Jemalloc.alloc_zeroed(layout) }
        } else {
            // SAFETY: as in `alloc`.
            unsafe { System.alloc_zeroed(layout) }
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.align() > MALLOC_ALIGN {
            // SAFETY: `ptr` came from `Jemalloc` with this layout (same alignment, same choice).
            unsafe { Jemalloc.dealloc(ptr, layout) }
        } else {
            // SAFETY: `ptr` came from `System` with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if layout.align() > MALLOC_ALIGN {
            // SAFETY: `ptr` came from `Jemalloc` with `layout`; the alignment is kept.
            unsafe { Jemalloc.realloc(ptr, layout, new_size) }
        } else {
            // SAFETY: `ptr` came from `System` with `layout`; the alignment is kept.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }
}
