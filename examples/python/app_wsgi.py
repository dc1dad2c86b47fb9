"""A plain WSGI app.

Over HTTP: anteroom --worker-protocol http -- gunicorn -w 1 --chdir examples/python app_wsgi:app
(gunicorn takes the socket anteroom passes on fd 3 through LISTEN_FDS.)
Over FastCGI: see app_flup.py.
"""
import os
import sys
import time
from urllib.parse import parse_qs


def app(environ, start_response):
    qs = parse_qs(environ.get("QUERY_STRING", ""))
    if "ms" in qs:
        time.sleep(min(int(qs["ms"][0]), 10000) / 1000)
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    uri = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    if not uri:
        uri = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        if environ.get("QUERY_STRING"):
            uri += "?" + environ["QUERY_STRING"]
    text = "Hello from Python %s (pid %d)\n%s %s\n" % (
        sys.version.split()[0], os.getpid(), environ["REQUEST_METHOD"], uri)
    if body:
        text += "body: %s\n" % body.decode("utf-8", "replace")
    # anteroom says when it received the request (t=microseconds since the epoch), as Heroku's router does.
    start = environ.get("HTTP_X_REQUEST_START", "")
    if start.startswith("t=") and start[2:].isdigit():
        text += "waited %d ms for this worker (X-Request-Start)\n" % (
            (time.time() * 1e6 - int(start[2:])) / 1000)
    data = text.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-Worker-Language", "python"),
                              ("Content-Length", str(len(data)))])
    return [data]
