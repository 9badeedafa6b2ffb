#!/usr/bin/env python3
"""A validating admission webhook for npd's tests: it makes the real kube-apiserver reject
(HTTP 422 Unprocessable Entity, as the server's own validation does) every write that carries a
marker, and allows everything else.

Rejected: a nodes/status write with a condition whose type is MARKER, and an Event whose reason
is MARKER. That is how a test gets a real 422 for a body the server refuses, as a policy engine
(Gatekeeper, Kyverno) or a stricter server version would refuse it.

Usage: webhook.py CERT KEY MARKER PORTFILE
Serves HTTPS on 127.0.0.1 on a free port, writes the port to PORTFILE once listening, and logs
one line per review to stderr. Standard library only.
"""

import json
import os
import ssl
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer


def rejected(obj, marker):
    """Whether the object under review carries the marker."""
    if not isinstance(obj, dict):
        return False
    if obj.get("kind") == "Event":
        return obj.get("reason") == marker
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(isinstance(c, dict) and c.get("type") == marker for c in conditions)


def main():
    cert, key, marker, portfile = sys.argv[1:5]

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            review = json.loads(self.rfile.read(length) or b"{}")
            request = review.get("request") or {}
            deny = rejected(request.get("object"), marker)
            response = {"uid": request.get("uid", ""), "allowed": not deny}
            if deny:
                response["status"] = {
                    "code": 422,
                    "reason": "Invalid",
                    "message": "rejected by npd's test webhook: it carries " + marker,
                }
            body = json.dumps(
                {
                    "apiVersion": review.get("apiVersion", "admission.k8s.io/v1"),
                    "kind": "AdmissionReview",
                    "response": response,
                }
            ).encode()
            sys.stderr.write(
                "[webhook] %s %s %s\n"
                % (request.get("operation"), request.get("resource"), "deny" if deny else "allow")
            )
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(server.server_address[1]))
    os.rename(portfile + ".tmp", portfile)
    server.serve_forever()


if __name__ == "__main__":
    main()
