"""What a real ``shoal loader serve`` admits from the network (M5): an allow-list path scope
that percent-encoded dot segments cannot leave (a real nginx decodes them)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("grpc")
pytest.importorskip("safetensors.torch")

from loader.errors import AccessDenied
from tests.integration.servers import running_nginx
from tests.integration.test_loader_sidecar import (
    assert_same,
    small_model,
    start_sidecar,
    write_checkpoint,
)


def test_encoded_dot_segments_cannot_leave_the_allowed_path(tmp_path: Path) -> None:
    with running_nginx(tmp_path / "web") as nginx:
        for folder, seed in (("public/model", 1), ("private/model", 2)):
            write_checkpoint(nginx.root / folder, small_model(seed=seed))
        public = f"http://127.0.0.1:{nginx.port}/public"
        sidecar = start_sidecar(tmp_path, allow=public)
        try:
            with sidecar.client() as client:
                with client.load(public + "/model/") as loaded:  # inside: staged
                    assert_same(loaded.tensors, nginx.root / "public" / "model")
                for escape in ("%2e%2e", "%2E%2E", ".%2e", "%252e%252e"):
                    with pytest.raises(AccessDenied, match="refused"):
                        client.prefetch(f"{public}/{escape}/private/model/")
                with pytest.raises(AccessDenied, match="refused"):
                    client.prefetch(f"{public}%2f..%2fprivate/model/")
                staged = [info.uri for info in client.list()]
            assert staged == [public + "/model/"], staged  # the private model never staged
        finally:
            assert sidecar.stop() == 0, sidecar.log()
