//! The C allocator: giving freed memory back to the kernel.

/// Returns the heap memory glibc keeps for reuse to the kernel; `true` if there was some.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim_heap() -> bool {
    // SAFETY: malloc_trim only walks and trims glibc's own arenas; it takes their locks itself.
    unsafe { libc::malloc_trim(0) == 1 }
}
