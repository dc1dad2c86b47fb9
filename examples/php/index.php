<?php
// Served by: anteroom --param SCRIPT_FILENAME=$PWD/examples/php/index.php -- php-cgi
// ?ms=N makes the request take N milliseconds, to watch anteroom's queue at work.
if (isset($_GET['ms'])) {
    usleep(min((int)$_GET['ms'], 10000) * 1000);
}
header('Content-Type: text/plain');
header('X-Worker-Language: php');
echo "Hello from PHP ", PHP_VERSION, " (pid ", getmypid(), ")\n";
echo $_SERVER['REQUEST_METHOD'], " ", $_SERVER['REQUEST_URI'], "\n";
$body = file_get_contents('php://input');
if ($body !== '') {
    echo "body: ", $body, "\n";
}
