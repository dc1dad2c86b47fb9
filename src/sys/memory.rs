//! The allocators (`sys/alloc.rs`): giving freed memory back to the kernel.

/// Returns the heap memory glibc and jemalloc keep for reuse to the kernel; `true` if glibc had some.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim_heap() -> bool {
    purge_jemalloc();
    // SAFETY: malloc_trim only walks and trims glibc's own arenas; it takes their locks itself.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// jemalloc returns freed pages as they age (`dirty_decay_ms`), but only when it is called: after a peak of
/// connections an idle process would keep them. `arena.<all>.purge` returns them now.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn purge_jemalloc() {
    // "arena.4096.purge": 4096 is MALLCTL_ARENAS_ALL.
    const PURGE_ALL: &[u8] = b"arena.4096.purge\0";
    // SAFETY: the name is NUL-terminated; this control takes no input and writes no output, so every pointer
    // is null and both lengths are 0, as jemalloc's manual says for `arena.<i>.purge`.
    let _ = unsafe {
        tikv_jemalloc_sys::mallctl(
            PURGE_ALL.as_ptr().cast(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
}
