"""Benchmark: the cost of sealing one sleeve chunk with AES-256-GCM through each library this machine has.

Compiles ``bench/aead_per_chunk.c`` (see its header for what is timed and why) against OpenSSL's libcrypto and
whichever of libsodium, GnuTLS, libgcrypt and nettle have their development headers, runs it and prints its
table: ns per 1,424-byte seal and open, and a 64 KiB seal's cost per 1,424 bytes (the per-call overhead is the
difference). Each library's bytes are checked against OpenSSL's before timing.

    .venv/bin/python -m bench.aead_per_chunk            # 200,000 messages, best of 5
    .venv/bin/python -m bench.aead_per_chunk -n 50000   # quicker

Debian packages for the optional rows: libsodium-dev, libgnutls28-dev, libgcrypt20-dev, nettle-dev.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("aead_per_chunk.c")
OPTIONAL = (  # (header, define, libraries)
    ("/usr/include/sodium.h", "HAVE_SODIUM", ["-lsodium"]),
    ("/usr/include/gnutls/crypto.h", "HAVE_GNUTLS", ["-lgnutls"]),
    ("/usr/include/gcrypt.h", "HAVE_GCRYPT", ["-lgcrypt"]),
    ("/usr/include/nettle/gcm.h", "HAVE_NETTLE", ["-lnettle"]),
)


def build(out: Path) -> None:
    """Compile the benchmark into ``out`` with every optional library whose header is present."""
    flags: list[str] = []
    libraries = ["-lcrypto"]
    for header, define, libs in OPTIONAL:
        if os.path.exists(header):
            flags.append(f"-D{define}")
            libraries += libs
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", *flags, "-o", str(out), str(SOURCE), *libraries], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=200_000, help="messages per timed run (default 200,000)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per row; the best is shown (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="aead-bench-") as tmp:
        binary = Path(tmp) / "aead_per_chunk"
        build(binary)
        return subprocess.run([str(binary), str(args.n), str(args.reps)], check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
