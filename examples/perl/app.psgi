# A PSGI app. Served by: anteroom -- plackup -s FCGI --manager= examples/perl/app.psgi
# (--manager= : no FCGI::ProcManager inside a slot; anteroom is the process manager, and a manager
# between it and the process serving the request would hide which request killed which process.)
# (Plack::Handler::FCGI takes the socket anteroom passes on fd 0; no --listen needed.)
use strict;
use warnings;
use Time::HiRes ();

my $app = sub {
    my $env = shift;
    if (($env->{QUERY_STRING} // '') =~ /(?:^|&)ms=(\d+)/) {
        Time::HiRes::sleep(($1 > 10000 ? 10000 : $1) / 1000);
    }
    my $body = '';
    if (my $len = $env->{CONTENT_LENGTH}) {
        $env->{'psgi.input'}->read($body, $len);
    }
    my $text = "Hello from Perl $^V (pid $$)\n"
      . "$env->{REQUEST_METHOD} $env->{REQUEST_URI}\n"
      . ($body ne '' ? "body: $body\n" : '');
    # anteroom says when it received the request (t=microseconds since the epoch), as Heroku's router does.
    if (($env->{HTTP_X_REQUEST_START} // '') =~ /^t=(\d+)$/) {
        $text .= sprintf("waited %d ms for this worker (X-Request-Start)\n",
            (Time::HiRes::time() * 1e6 - $1) / 1000);
    }
    return [200, ['Content-Type' => 'text/plain', 'X-Worker-Language' => 'perl'], [$text]];
};
