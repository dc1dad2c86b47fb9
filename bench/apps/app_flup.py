"""Serves app.py over FastCGI with flup, on the listening socket anteroom passes as fd 0.

Not a second app: only the launcher (bindAddress=None makes flup take fd 0, as spawn-fcgi would give it).
"""
import os
import sys

from flup.server.fcgi import WSGIServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from app import app  # noqa: E402

if __name__ == "__main__":
    # One request at a time per process: anteroom is the pool.
    WSGIServer(app, bindAddress=None, multithreaded=False, multiplexed=False).run()
