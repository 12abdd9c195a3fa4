"""qlora_guide: quantize, fine-tune with QLoRA, evaluate and deploy language models.

The package follows the pipeline of the guide, one module per stage::

    quantization -> models -> data -> training -> evaluation -> deployment

Importing it is cheap: torch, transformers and friends are imported by the
functions that need them, so ``qlora-guide --help`` answers at once.
"""

from qlora_guide.errors import QLoRAGuideError

__version__ = "0.1.0"
__all__ = ["QLoRAGuideError", "__version__"]
