"""The test suite's SMTP server: aiosmtpd, delivering into a Maildir.

    python3 tests/smtp/server.py --maildir DIR [--port N]

Prints "listening PORT" once it accepts connections, then serves until
killed. Like a real relay it refuses some recipients, so clinflow's error
handling is exercised against real SMTP replies:

- a recipient whose local part starts with "tempfail" gets 451 (try again
  later) on its first RCPT TO, and is accepted after that;
- a recipient whose local part starts with "reject" gets 550 (no such
  user), always;
- a recipient whose local part starts with "hangup-before" has the
  connection dropped, with no reply, at its first RCPT TO (nothing taken),
  and is accepted after that;
- a message to a recipient whose local part starts with "hangup-after" is
  stored, and then the connection is dropped before the reply to the
  message's final dot: the server took it and the client never hears so.

Every accepted message is one file in DIR/new (Python's mailbox.Maildir).
"""

import argparse
import asyncio
import mailbox
import socket
import sys

from aiosmtpd.controller import Controller


class Handler:
    def __init__(self, maildir):
        self.maildir = mailbox.Maildir(maildir, create=True)
        self.tempfailed = set()
        self.hung_up = set()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        local = address.split("@", 1)[0].lower()
        if local.startswith("reject"):
            return "550 5.1.1 no such user here"
        if local.startswith("tempfail") and address not in self.tempfailed:
            self.tempfailed.add(address)
            return "451 4.3.2 try again later"
        if local.startswith("hangup-before") and address not in self.hung_up:
            self.hung_up.add(address)
            server.transport.abort()
            return "250 OK (never sent: the connection is gone)"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        self.maildir.add(envelope.original_content)
        if any(a.split("@", 1)[0].lower().startswith("hangup-after") for a in envelope.rcpt_tos):
            server.transport.abort()
        return "250 OK queued"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--maildir", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--exit-on-eof", action="store_true", help="stop when stdin closes")
    args = ap.parse_args()
    port = args.port or free_port()
    controller = Controller(Handler(args.maildir), hostname="127.0.0.1", port=port)
    controller.start()
    print(f"listening {port}", flush=True)
    try:
        if args.exit_on_eof:
            # The test process holds stdin: it ends when the tests do.
            sys.stdin.read()
        else:
            asyncio.run(asyncio.Event().wait())
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


if __name__ == "__main__":
    sys.exit(main())
