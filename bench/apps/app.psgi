# The benchmark's PSGI app: sleep ?ms=N milliseconds (0 or absent = trivial), then answer a short text.
# Served by Starman (behind nginx) and by anteroom -- plackup -E deployment -s FCGI --manager= app.psgi.
use strict;
use warnings;
use Time::HiRes ();

my $body = "hello from perl\n";

my $app = sub {
    my $env = shift;
    if (($env->{QUERY_STRING} // '') =~ /(?:^|&)ms=(\d+)/ && $1 > 0) {
        Time::HiRes::sleep(($1 > 10000 ? 10000 : $1) / 1000);
    }
    return [200, ['Content-Type' => 'text/plain', 'Content-Length' => length($body)], [$body]];
};

$app;
