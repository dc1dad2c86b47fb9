# The PHP stack of a php-cgi (or php-fpm) worker, for anteroom's --slowlog-command:
#   --slowlog-command 'gdb -p {pid} -batch -x examples/slowlog/php-backtrace.gdb 2>&1'
# Calls the Zend engine's own exported functions (no debug symbols needed): debug_backtrace() without
# arguments (DEBUG_BACKTRACE_IGNORE_ARGS = 2), printed as print_r does, 24 bytes into the zend_string
# (refcount, type info, hash, length). Tested with PHP 8.2 on Debian 12. It runs engine code inside the
# stopped worker: safe while the worker waits in a system call (the event's syscall), not when it was
# stopped in the middle of the engine's allocator (state R): see the README.
set $zv = (void*)malloc(16)
call (void)zend_fetch_debug_backtrace($zv, 0, 2, 0)
set $s = (char*)zend_print_zval_r_to_str($zv, 0)
printf "%s\n", $s + 24
