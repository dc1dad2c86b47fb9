<?php
// The benchmark's PHP app: sleep ?ms=N milliseconds (0 or absent = trivial), then answer a short text.
// Served by php-fpm (behind nginx) and by anteroom -- php-cgi, with SCRIPT_FILENAME pointing here.
$ms = isset($_GET['ms']) ? (int)$_GET['ms'] : 0;
if ($ms > 0) {
    usleep(min($ms, 10000) * 1000);
}
header('Content-Type: text/plain');
echo "hello from php\n";
