#!/usr/bin/env python3
"""Ask Portcullis's gRPC door (Envoy ext_authz v3 Check) about one HTTP request.

  python3 check_client.py --target 127.0.0.1:9191 --method GET --path '/api/orders?page=2' \
      --token "$TOKEN" --client-cert client.pem --header 'x-request-id: 42'

Prints `allow` or `deny`, the status and the headers; exits 0 on allow, 1 on deny,
2 when the call itself failed. Needs: python3 -m pip install grpcio xds-protos
"""

import argparse
import sys
import urllib.parse
from pathlib import Path

try:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
except ImportError as e:
    print(f"check_client: missing Python module ({e}); pip install grpcio xds-protos", file=sys.stderr)
    sys.exit(2)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True, help="Portcullis gRPC address, host:port")
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/", help="path with its query string, as the client sent it")
    p.add_argument("--host", default="localhost", help="the request's Host (:authority)")
    p.add_argument("--token", help="sent as `authorization: Bearer TOKEN`")
    p.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'")
    p.add_argument("--client-cert", help="the client's certificate (PEM file), as Envoy forwards it")
    p.add_argument("--ca", help="CA (PEM file) to verify a TLS gRPC listener; plaintext without it")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds")
    args = p.parse_args()

    req = external_auth_pb2.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host, http.scheme = args.method, args.path, args.host, "https"
    headers = {":method": args.method, ":path": args.path, ":authority": args.host, ":scheme": "https"}
    for line in args.header:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if args.token:
        headers["authorization"] = f"Bearer {args.token}"
    http.headers.update(headers)  # lower-case names, pseudo-headers included, as Envoy sends them
    if args.client_cert:  # Envoy's `source.certificate`: the PEM, URL-encoded
        req.attributes.source.certificate = urllib.parse.quote(Path(args.client_cert).read_text(), safe="")

    if args.ca:
        channel = grpc.secure_channel(args.target, grpc.ssl_channel_credentials(Path(args.ca).read_bytes()))
    else:
        channel = grpc.insecure_channel(args.target)
    try:
        with channel:
            resp = external_auth_pb2_grpc.AuthorizationStub(channel).Check(req, timeout=args.timeout)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 2

    allowed = resp.status.code == 0  # only OK allows; any other code denies, as in Envoy
    print("allow" if allowed else "deny")
    if allowed:
        print("status: 200")
        shown = resp.ok_response.headers
        for name in resp.ok_response.headers_to_remove:
            print(f"remove: {name}")
    else:
        status, reason = resp.denied_response.status.code or 403, resp.status.message
        print(f"status: {status} (gRPC code {resp.status.code}: {reason})")
        shown = resp.denied_response.headers
    for option in shown:
        print(f"header: {option.header.key}: {option.header.value}")
    if not allowed and resp.denied_response.body:
        print(f"body: {resp.denied_response.body.strip()}")
    return 0 if allowed else 1


if __name__ == "__main__":
    sys.exit(main())
