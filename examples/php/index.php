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
// anteroom says when it received the request (t=microseconds since the epoch), as Heroku's router does.
if (preg_match('/^t=(\d+)$/', $_SERVER['HTTP_X_REQUEST_START'] ?? '', $m)) {
    printf("waited %d ms for this worker (X-Request-Start)\n", (microtime(true) * 1e6 - (int)$m[1]) / 1000);
}
$body = file_get_contents('php://input');
if ($body !== '') {
    echo "body: ", $body, "\n";
}
