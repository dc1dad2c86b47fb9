# A PSGI app. Served by: anteroom -- plackup -s FCGI examples/perl/app.psgi
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
    return [200, ['Content-Type' => 'text/plain', 'X-Worker-Language' => 'perl'], [$text]];
};
