# The Perl stack of a Perl worker (FCGI, CGI::Fast, Plack's FCGI handler), for anteroom's --slowlog-command:
#   --slowlog-command 'gdb -p {pid} -batch -x examples/slowlog/perl-backtrace.gdb 2>&1'
# Evaluates Carp::longmess in the worker's interpreter (a perl built with threads, as Debian's is: the
# interpreter is PL_curinterp) and prints the string it returns. No debug symbols needed. Tested with
# Perl 5.36 on Debian 12. It runs Perl code inside the stopped worker: safe while the worker waits in a
# system call (the event's syscall), not when it was stopped in the middle of the interpreter (state R):
# see the README.
set $sv = (void*)Perl_eval_pv((void*)PL_curinterp, "require Carp; Carp::longmess(q{slow request})", 0)
printf "%s\n", (char*)Perl_sv_2pv_flags((void*)PL_curinterp, $sv, 0, 2)
