"""The `cifar10-cnn` command (also `python -m app`): classify image files, or start the service.

    cifar10-cnn predict samples/*.jpg                       # label and confidence per file
    cifar10-cnn predict cat.png --top-k 3 --json            # the service's JSON
    cifar10-cnn predict ship.jpg --url http://host:8000     # another service (or $CIFAR10_URL)
    cifar10-cnn predict samples/*.jpg --model lite          # the small model
    cifar10-cnn predict samples/*.jpg --model best          # the most accurate model
    cifar10-cnn serve --port 8000                           # uvicorn app.main:app

Exit status: 0 answered, 1 the service refused or could not be reached, 2 a usage error or a
file that cannot be read. Every failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from app.client import DEFAULT_URL, Client, ClientError, FileError


def _predict(args: argparse.Namespace) -> int:
    with Client(args.url, api_key=args.api_key, timeout=args.timeout) as client:
        predictions = client.predict(args.images, top_k=args.top_k, model=args.model)
    if args.json:
        print(json.dumps(predictions, indent=2))
        return 0
    width = max(len(p["filename"] or "") for p in predictions)
    for p in predictions:
        others = ", ".join(f"{c['label']} {c['probability']:.3f}" for c in p["top_k"][1:])
        print(
            f"{p['filename'] or '-':<{width}}  {p['label']:<10}  {p['confidence']:.3f}"
            + (f"  ({others})" if others else "")
        )
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    # The HTTP protocol with the connection cap, the slow-client deadlines and the admission gate
    # (app/connections.py); a listen backlog as deep as the connection cap.
    uvicorn.run(
        "app.main:app",
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        http=args.http,
        backlog=args.backlog,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifar10-cnn", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{predict,serve}")

    p = sub.add_parser("predict", help="classify image files with a running service")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, WebP, ...)")
    p.add_argument(
        "--url",
        default=os.environ.get("CIFAR10_URL", DEFAULT_URL),
        help="the service (default: $CIFAR10_URL or %(default)s)",
    )
    p.add_argument("--top-k", type=int, default=3, help="classes per image, 1-10 (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the service's predictions as JSON")
    p.add_argument("--model", help="the model to ask: final, lite or best (default: the service's, final)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("CIFAR10_API_KEY"),
        help="X-API-Key for a service that needs one (default: $CIFAR10_API_KEY)",
    )
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request (default: %(default)s)")
    p.set_defaults(run=_predict)

    s = sub.add_parser(
        "serve", help="start the service (uvicorn app.main:app; settings: CIFAR10_* variables)"
    )
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    s.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    s.add_argument("--log-level", default="info", help="uvicorn's log level (default: %(default)s)")
    s.add_argument(
        "--http",
        default="app.connections:GuardedHTTPProtocol",
        help="uvicorn's HTTP protocol (default: %(default)s: connection cap, slow-client deadlines and the "
        "admission gate; 'httptools' or 'h11' for uvicorn's own, without them)",
    )
    s.add_argument("--backlog", type=int, default=2048, help="listen backlog (default: %(default)s)")
    s.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "predict" and not 1 <= args.top_k <= 10:
        print("error: --top-k must be between 1 and 10", file=sys.stderr)
        return 2
    if args.command == "predict" and not args.images:
        print("error: no image files given", file=sys.stderr)
        return 2
    try:
        return args.run(args)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, FileError) else 1


if __name__ == "__main__":
    sys.exit(main())
