"""Response bodies of the API, as pydantic models (they are also the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

MODEL_ID = "The name to ask for it by: final (the default), lite or best, in ?model= and /v2/models/."


class ClassProbability(BaseModel):
    label: str = Field(examples=["cat"])
    probability: float = Field(description="Calibrated probability, 0 to 1.", examples=[0.91])


class Prediction(BaseModel):
    filename: str | None = Field(
        description="The uploaded file's name, if the client gave one.", examples=["cat.jpg"]
    )
    label: str = Field(description="The most likely class.", examples=["cat"])
    index: int = Field(description="Its position in the class list (CIFAR-10 order), 0-9.", examples=[3])
    confidence: float = Field(
        description="Its probability, 0 to 1, calibrated on validation images (temperature scaling): "
        "of CIFAR-10-like images answered at confidence 0.8, about 80% are right.",
        examples=[0.91],
    )
    top_k: list[ClassProbability] = Field(description="The top_k most likely classes, most likely first.")
    unsure: bool | None = Field(
        description="true when the picture looks unlike the CIFAR-10 photos the model knows (ood_score "
        "above the model's threshold, which leaves 95% of CIFAR-10 test images unflagged): the label is "
        "then a guess. null when the model has no detector (see /model/summary).",
        examples=[False],
    )
    ood_score: float | None = Field(
        description="How far the picture's statistics lie from the training images' (largest z-score "
        "over the network's stages; higher is stranger). null when the model has no detector.",
        examples=[-0.42],
    )
    heatmap: list[list[float]] | None = Field(
        default=None,
        description="With ?explain=cam only: 32x32 rows, 0 to 1, of where the evidence for the label "
        "lies in the 32x32 image the model saw (CAM, or Grad-CAM for AirbenchNet).",
    )


class ModelRef(BaseModel):
    name: str = Field(
        description="The network: FinalModel, LiteModel or AirbenchNet.", examples=["FinalModel"]
    )
    id: str = Field(description=MODEL_ID, examples=["final"])
    sha256: str = Field(
        description="sha256 of the weights file that made these predictions.",
        examples=["b20dc1005013cea45bf8ca548e7e825b25fc630e4fa86cea7efcdebb50439cf9"],
    )
    device: str = Field(examples=["cpu"])


class Timing(BaseModel):
    total_ms: float = Field(
        description="From the request reaching the model service to the answer.", examples=[2.9]
    )
    decode_ms: float = Field(description="Checking and decoding the uploads.", examples=[0.3])
    queue_ms: float = Field(description="Longest wait of an image for its batch.", examples=[0.1])
    inference_ms: float = Field(
        description="Model time of the (longest) batch that served the images.", examples=[2.0]
    )
    batch_size: int = Field(
        description="Images in the (largest) forward pass that served them.", examples=[1]
    )


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="One per uploaded file, in upload order.")
    model: ModelRef
    timing: Timing


class LayerInfo(BaseModel):
    name: str = Field(description="Type and position in execution order, e.g. Conv2d-1.")
    type: str
    output_shape: list[int] = Field(description="With -1 for the batch dimension.")
    params: int


class Normalization(BaseModel):
    mean: list[float]
    std: list[float]


class ServingInfo(BaseModel):
    batching: bool
    max_batch_size: int
    max_wait_ms: float
    max_queue_size: int
    workers: int
    torch_threads: int
    max_files: int
    max_body_bytes: int
    max_pixels: int


class InferenceInfo(BaseModel):
    backend: str = Field(description="What runs the forward pass: pytorch or onnxruntime.")
    precision: str = Field(description="fp32, or bf16 (autocast; changes a few labels).")
    device: str
    threads: int = Field(description="Intra-op threads of one forward pass.")
    layout: str = Field(description="Activation memory layout (PyTorch): nchw or channels_last.")


class CalibrationInfo(BaseModel):
    temperature: float = Field(description="Probabilities are softmax(logits / temperature); 1: not fitted.")
    calibrated: bool = Field(description="Whether the checkpoint records a temperature fitted on validation.")
    unsure_detector: bool = Field(description="Whether predictions carry ood_score and unsure.")
    ood_threshold: float | None = Field(description="ood_score above it is unsure; null without a detector.")
    explain: str = Field(description="The heatmap ?explain=cam returns: cam or grad-cam.")


class ModelSummary(BaseModel):
    model: str = Field(description="The network: FinalModel, LiteModel or AirbenchNet.")
    id: str = Field(description=MODEL_ID)
    total_params: int
    trainable_params: int
    non_trainable_params: int
    macs: int = Field(description="Multiply-accumulates of the convolutions and linear layers per image.")
    input_shape: list[int]
    layers: list[LayerInfo] = Field(description="Every leaf layer, measured with forward hooks.")
    device: str
    dtype: str = Field(description="Compute dtype: float32, or bfloat16 with precision bf16.")
    inference: InferenceInfo
    classes: list[str]
    normalization: Normalization
    sha256: str = Field(description="sha256 of the weights file.")
    weights_file: str
    loaded_at: str
    calibration: CalibrationInfo
    checkpoint: dict[str, Any] = Field(
        description="The checkpoint's metadata: metrics (test_acc...), epoch, created_at, config... "
        "Empty for a bare state_dict."
    )
    serving: ServingInfo


class Health(BaseModel):
    status: str = Field(
        description="/health/live: alive. /health/ready: ready (200), or starting, draining or stopping "
        "(503 with Retry-After)."
    )
    model_sha256: str | None = Field(
        default=None, description="sha256 of the served weights file; null while loading and in 503 answers."
    )
