"""freshrec's core library: datasets, the ALS model and fold-in, catalog snapshots, user store.

It never imports grpc: the two services are thin shells over it.
"""

from pathlib import Path


def snapshots_dir(data_dir: Path) -> Path:
    """Where a data dir keeps its catalog snapshots (and CURRENT)."""
    return data_dir / "snapshots"


def users_dir(data_dir: Path) -> Path:
    """Where a data dir keeps its LMDB user store."""
    return data_dir / "users.lmdb"
