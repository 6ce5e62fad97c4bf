"""The `describe` op of the model host: one image and a prompt through `VLMPipeline`.

Runs inside the model host process (see `host`), which has loaded a model of kind `vlm`.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from famulus.daemon.model.host import Host


def image_tensor(pixels_b64: str, shape: list[int]) -> Any:
    """Build the uint8 NHWC tensor that VLMPipeline takes from base64 HWC RGB samples."""
    import numpy as np
    import openvino

    from famulus.daemon.model.host import HostError

    height, width, channels = (int(n) for n in shape)
    data = base64.b64decode(pixels_b64, validate=True)
    if channels != 3 or height < 1 or width < 1 or len(data) != height * width * channels:
        raise HostError("bad_request", f"image of {len(data)} bytes does not match the shape "
                        f"{shape}; expected height, width, 3 and one byte per sample")
    array = np.frombuffer(data, dtype=np.uint8).reshape(1, height, width, channels)
    return openvino.Tensor(np.ascontiguousarray(array))


def describe(host: Host, request: dict[str, Any]) -> dict[str, Any]:
    """Generate text about one image; streams, honours cancel and `timeout_s` like generate.

    The reader thread clears the cancel flag when the request arrives (see `host.main`).
    """
    import openvino_genai


    image = image_tensor(str(request["pixels"]), list(request["shape"]))
    config = openvino_genai.GenerationConfig()
    config.max_new_tokens = int(request["max_new_tokens"])
    config.repetition_penalty = float(request.get("repetition_penalty", 1.0))
    config.do_sample = False
    # The pipeline applies the model's chat template and inserts the image tokens itself.
    result, elapsed = host.run_streamed(request, lambda streamer: host.pipe.generate(
        str(request["prompt"]), images=[image], generation_config=config, streamer=streamer))
    return {"text": result.texts[0],
            "tokens": int(result.perf_metrics.get_num_generated_tokens()),
            "generation_s": round(elapsed, 3)}
