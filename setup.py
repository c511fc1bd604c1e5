"""The one compiled part of the Python package: the offload sleeve's hot loop (weaved/adapters/_sleevepump.c).

Everything else is in pyproject.toml. The extension is optional: without a C compiler (or without OpenSSL's
headers, Debian's ``libssl-dev``: the pump seals with libcrypto) the install still succeeds and the sleeve runs
its Python loop (slower, same behaviour; ``weaved status`` says which)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("weaved.adapters._sleevepump", ["weaved/adapters/_sleevepump.c"], optional=True,
                             libraries=["crypto"], extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror"])])
