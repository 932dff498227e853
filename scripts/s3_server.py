"""Start the test S3 server by hand: ``python scripts/s3_server.py [--root DIR] [--port N]``.

Prints the environment to export so the CLI (or anything using botocore) reaches it, then serves
until Ctrl-C. Data lives in ``--root`` (a temp dir by default) and survives restarts.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from s3server import S3Server  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="directory holding the buckets")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    parser.add_argument("--backend", default="auto", choices=["auto", "rclone", "moto"])
    args = parser.parse_args()
    server = S3Server(args.root, port=args.port, backend=args.backend)
    with server:
        for name in args.bucket:
            server.create_bucket(name)
        # This is a CLI for local development: printing the throwaway credentials is its purpose.
        for k, v in server.env().items():
            print(f"export {k}={shlex.quote(v)}")
        print(f"# serving {server.root} at {server.endpoint_url}; Ctrl-C to stop", flush=True)
        try:
            while server.is_running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
