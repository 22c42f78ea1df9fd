"""Build hook: generates shoal_client/_proto from the repository's proto files.

The stubs are made by grpcio-tools from ../../proto/proto (or $SHOAL_PROTO_DIR) when the
package is built, and their `from shoal import x_pb2` lines are pointed at this package
(protoc names modules by the proto files' paths). Nothing generated is committed.
"""

import os
import pathlib
import re

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).resolve().parent
PROTOS = ("coordinator.proto", "node.proto")


def generate(out: pathlib.Path) -> None:
    from grpc_tools import protoc  # a build requirement (pyproject.toml)
    import grpc_tools

    root = pathlib.Path(os.environ.get("SHOAL_PROTO_DIR", HERE / ".." / ".." / "proto" / "proto"))
    if not (root / "shoal" / "node.proto").exists():
        raise SystemExit(f"shoal-client: no proto files under {root} (set SHOAL_PROTO_DIR)")
    gen = out / "shoal"
    gen.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    for name in PROTOS:
        rc = protoc.main([
            "protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(root / "shoal" / name),
        ])
        if rc != 0:
            raise SystemExit(f"shoal-client: protoc failed on {name}")
    for f in gen.glob("*.py*"):
        text = f.read_text()
        text = re.sub(r"^from shoal import", "from shoal_client._proto.shoal import", text, flags=re.M)
        text = re.sub(r"^import shoal\.", "import shoal_client._proto.shoal.", text, flags=re.M)
        f.write_text(text)
    (gen / "__init__.py").write_text("")
    (out / "__init__.py").write_text('"""gRPC stubs generated from proto/ at build time."""\n')


class BuildWithStubs(build_py):
    def run(self):
        generate(HERE / "shoal_client" / "_proto")
        super().run()
        # The generated subpackage, copied beside the rest.
        target = pathlib.Path(self.build_lib) / "shoal_client" / "_proto"
        src = HERE / "shoal_client" / "_proto"
        for f in src.rglob("*"):
            if f.is_file() and f.suffix in (".py", ".pyi"):
                dest = target / f.relative_to(src)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(f.read_bytes())


setup(cmdclass={"build_py": BuildWithStubs})
