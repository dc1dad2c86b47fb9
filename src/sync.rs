//! The one way the crate takes a `std::sync::Mutex`.
//!
//! A thread that panics while holding a lock poisons it. anteroom's locks guard small tables (the queue,
//! the board, the quarantine, the connection table, counters) whose every critical section leaves them
//! consistent at each step, so a poisoned lock holds data as good as any: refusing it would turn one bug
//! into a server that answers nothing. Every lock goes through here so that this choice is made once.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the data even if another thread panicked while holding it (see the module doc).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_still_gives_its_data() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
