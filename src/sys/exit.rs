//! Exit codes of the anteroom process: what systemd or an operator sees. They sit here, below both the
//! pool (which decides to exit) and the app (which exits), so that neither depends on the other for them.

/// The exit code when --crash-exit's limit is reached: distinct, so that systemd or an operator can tell
/// a crash loop of the app from a failure of anteroom itself (1) or a bad command line (2).
pub const CRASH_LOOP: u8 = 3;
