"""`make demo`'s orchestration (infra/demo.py) without running the loop: its config, its flags,
and its refusal to start over services it does not own."""

from __future__ import annotations

import socket

import pytest

from diffbir.config import build_parser
from pipelines.ray_env import free_port

from conftest import infra_demo

demo = infra_demo()


def test_every_field_is_a_flag():
    flags = {a.dest for a in build_parser(demo.DemoConfig)._actions} - {"help", "config"}
    assert flags == set(demo.DemoConfig.model_fields)


def test_a_port_in_use_stops_the_demo_before_it_starts_anything(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit, match=f"port {port} on 127.0.0.1 is in use"):
            demo.main(
                [
                    "--workdir",
                    str(tmp_path / "demo"),
                    "--mlflow-port",
                    str(port),
                    *(
                        a
                        for flag in ("--ray-port", "--dashboard-port", "--serve-port")
                        for a in (flag, str(free_port()))
                    ),
                ]
            )
    assert not (tmp_path / "demo").exists()  # nothing was created or removed


def test_sample_archive_holds_real_photos_in_folders(tmp_path):
    import tarfile

    from diffbir.image_io import decode_image

    path = demo.write_sample_archive(tmp_path / "photos.tar.gz")
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert names[0].startswith("cats/") and all(n.endswith(".png") for n in names)
        image, _ = decode_image(tar.extractfile(names[0]).read(), names[0])
    assert image.shape == (75, 113, 3) and image.std() > 0.1  # a quarter-size chelsea, not a blank
