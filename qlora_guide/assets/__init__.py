"""Data files shipped with the package: model configurations and the bilingual QLoRA FAQ dataset."""
