"""The build step pyproject.toml cannot state: the gRPC stubs are generated from protos/
into the package of every wheel (and of the wheel built from an sdist), with the .proto
files beside them for clients in other languages, grpcurl and reflection-less tools.

A checkout keeps only the protos (the stubs are git-ignored; `make proto` writes them into
the tree for development).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PROTOS = Path("protos")


class BuildPyWithStubs(build_py):
    """build_py, then protoc over protos/ into the build directory."""

    def run(self) -> None:
        super().run()
        import grpc_tools
        from grpc_tools import protoc

        out = Path(self.build_lib)
        sources = sorted(str(p) for p in PROTOS.glob("recsys/v1/*.proto"))
        well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
        status = protoc.main(["grpc_tools.protoc", f"-I{PROTOS}", f"-I{well_known}",
                              f"--python_out={out}", f"--grpc_python_out={out}",
                              f"--pyi_out={out}", *sources])
        if status != 0:
            raise RuntimeError(f"protoc failed ({status}) on {sources}")
        for source in sources:
            target = out / Path(source).relative_to(PROTOS)
            shutil.copyfile(source, target)


setup(cmdclass={"build_py": BuildPyWithStubs})
