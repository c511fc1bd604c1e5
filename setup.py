"""The one compiled part of the Python package: the offload sleeve's hot loop (weaved/adapters/_sleevepump.c).

Everything else is in pyproject.toml. The extension is optional: without a C compiler (or without OpenSSL's
headers, Debian's ``libssl-dev``: the pump seals with libcrypto) the install still succeeds and the sleeve runs
its Python loop (slower, same behaviour; ``weaved status`` says which). With libgcrypt's headers (Debian's
``libgcrypt20-dev``) the pump seals with libgcrypt instead where the CPU has AES-NI and PCLMULQDQ: the same
AES-256-GCM at about two thirds of EVP's cost per chunk (bench/aead_per_chunk.py); EVP stays the fallback.
``WEAVED_NO_GCRYPT=1`` builds without it."""

import os

from setuptools import Extension, setup

GCRYPT = not os.environ.get("WEAVED_NO_GCRYPT") and any(
    os.path.exists(os.path.join(d, "gcrypt.h")) for d in ("/usr/include", "/usr/local/include"))

setup(ext_modules=[Extension("weaved.adapters._sleevepump", ["weaved/adapters/_sleevepump.c"], optional=True,
                             libraries=["crypto"] + (["gcrypt"] if GCRYPT else []),
                             define_macros=[("HAVE_GCRYPT", "1")] if GCRYPT else [],
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"])])
