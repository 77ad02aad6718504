"""ComfyUI nodes of the pack. ComfyUI itself is imported only inside node functions."""

from .calibrate import CalibrateForQuantFP16, CalibrateTextEncoderForQuantFP16, LoadCalibrationFP16, SaveCalibrationFP16
from .checkpoint import LoadCheckpointForQuant
from .loader import ScaledFP16Loader
from .quantize import LearnedRoundingFP16
from .save import SaveScaledFP16

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "LoadCheckpointForQuant": LoadCheckpointForQuant,
    "LearnedRoundingFP16": LearnedRoundingFP16,
    "SaveScaledFP16": SaveScaledFP16,
    "ScaledFP16Loader": ScaledFP16Loader,
    "CalibrateForQuantFP16": CalibrateForQuantFP16,
    "CalibrateTextEncoderForQuantFP16": CalibrateTextEncoderForQuantFP16,
    "SaveCalibrationFP16": SaveCalibrationFP16,
    "LoadCalibrationFP16": LoadCalibrationFP16,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "LoadCheckpointForQuant": "Load Checkpoint for Quantization",
    "LearnedRoundingFP16": "Learned Rounding FP16",
    "SaveScaledFP16": "Save Scaled FP16",
    "ScaledFP16Loader": "Scaled FP16 Loader",
    "CalibrateForQuantFP16": "Calibrate Diffusion Model for FP16",
    "CalibrateTextEncoderForQuantFP16": "Calibrate Text Encoder for FP16",
    "SaveCalibrationFP16": "Save Calibration",
    "LoadCalibrationFP16": "Load Calibration",
}
