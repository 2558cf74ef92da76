"""digits-onnx from a Docker replica (inferoxy/digits-onnx, FROM docker/onnx-base): the numpy digits' labels over
REST, gRPC and ZeroMQ; an ONNX spec with no image runs in INFEROXY_ONNX_IMAGE and its load failure is the model's
reason. Needs what tests/test_docker_end_to_end.py needs (an engine, docker/build-images.sh)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from examples.train_digits import held_out_split
from tests.support import wait_for
from tests.test_docker_end_to_end import (  # noqa: F401 (fixtures)
    DIGITS,
    containers_of,
    docker_proxy,
    images,
    instance,
    model_status,
    models_file,
)
from tests.test_onnx_end_to_end import labels_over_grpc, labels_over_rest, labels_over_zmq

pytest.importorskip("docker")

DIGITS_ONNX = ("  digits-onnx: {format: onnx, model_uri: examples/models/digits/digits.onnx,\n"
               "                image: inferoxy/digits-onnx, max_batch_size: 32, max_batch_delay_ms: 2,\n"
               "                inputs: [{name: image, datatype: FP32, shape: [64]}]}\n")
# No image: the default ONNX image, which holds no such file.
NO_FILE = "  no-file: {format: onnx, model_uri: /models/absent.onnx}\n"


def test_digits_onnx_in_a_container_matches_digits_and_a_load_failure_is_the_reason(  # noqa: F811 (fixtures)
    engine: Any, images: None, instance: str, tmp_path: Path, real_redis_url: str, redis_prefix: str  # noqa: F811
) -> None:
    models = models_file(tmp_path, DIGITS, DIGITS_ONNX, NO_FILE)
    with docker_proxy(instance, models, real_redis_url, redis_prefix) as proxy:
        for name in ("digits", "digits-onnx"):
            wait_for(lambda name=name: (s := model_status(real_redis_url, redis_prefix, name)) and s.state == "ready",
                     timeout=90, what=f"{name} ready")
        (container,) = containers_of(engine, instance, "digits-onnx")
        assert container.attrs["Image"].startswith("inferoxy/digits-onnx") or "digits-onnx" in str(
            engine.images.get(container.attrs["Image"]).tags)

        images_x, truth = held_out_split()
        images_x = images_x.astype(np.float32)
        for over in (labels_over_rest, labels_over_grpc, labels_over_zmq):
            onnx_labels = over(proxy, "digits-onnx", images_x)
            np.testing.assert_array_equal(onnx_labels, over(proxy, "digits", images_x), err_msg=over.__name__)
            assert float(np.mean(onnx_labels == truth)) > 0.95

        status = wait_for(lambda: (s := model_status(real_redis_url, redis_prefix, "no-file")) and s.state == "failed"
                          and s, timeout=90, what="no-file failed")
        assert "model_uri '/models/absent.onnx': no such file" in (status.reason or ""), status
