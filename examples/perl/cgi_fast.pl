#!/usr/bin/perl
# A classic CGI::Fast (FCGI.pm) script. Served by: anteroom -- perl examples/perl/cgi_fast.pl
use strict;
use warnings;
use CGI::Fast;
use Time::HiRes ();

while (my $q = CGI::Fast->new) {
    my $ms = $q->url_param('ms');
    Time::HiRes::sleep(($ms > 10000 ? 10000 : $ms) / 1000) if defined $ms && $ms =~ /^\d+$/;
    print $q->header(-type => 'text/plain', -x_worker_language => 'perl-cgi-fast');
    print "Hello from CGI::Fast (pid $$)\n";
    print "$ENV{REQUEST_METHOD} $ENV{REQUEST_URI}\n";
}
