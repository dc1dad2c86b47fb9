"""A WSGI app served over FastCGI by flup. Run: anteroom -- python3 examples/python/app_flup.py

bindAddress=None makes flup take the listening socket on fd 0, which is where anteroom puts it.
"""
import os
import sys
import time

from flup.server.fcgi import WSGIServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from app_wsgi import app  # noqa: E402

if __name__ == "__main__":
    # multithreaded=False: anteroom sends one request at a time per worker; it is the pool.
    WSGIServer(app, bindAddress=None, multithreaded=False, multiplexed=False).run()
