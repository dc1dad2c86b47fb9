"""The benchmark's WSGI app: sleep ?ms=N milliseconds (0 or absent = trivial), then answer a short text.

Served by gunicorn (behind nginx, or directly) as `app:app`, by anteroom -- gunicorn through LISTEN_FDS,
and over FastCGI by flup (app_flup.py).
"""
import time
from urllib.parse import parse_qs

BODY = b"hello from python\n"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):
    qs = environ.get("QUERY_STRING", "")
    if qs:
        ms = parse_qs(qs).get("ms")
        if ms and int(ms[0]) > 0:
            time.sleep(min(int(ms[0]), 10000) / 1000)
    start_response("200 OK", HEADERS)
    return [BODY]
