"""medsynth: lesion-mask-driven synthesis of multi-sequence brain MRI, built on MONAI."""

__version__ = "0.2.0"
