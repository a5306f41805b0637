"""The accept loop the tests' fake servers share (QMP, tgtd, NBD peers,
banners): each fake binds and listens on ``self.sock``, then calls
:meth:`AcceptLoop.serve_in_background`; :meth:`handle` gets every
connection and owns it."""

import threading


class AcceptLoop:
    sock = None

    def serve_in_background(self):
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return          # the test closed the socket
            self.handle(conn)

    def handle(self, conn):
        raise NotImplementedError
