import torch

def quantification_post_entrainement(model):
    """
    Quantification après l'entraînement
    Préserve les poids originaux
    Réduit la taille en mémoire
    """
    return torch.quantization.quantize_dynamic(
        model,
        {torch.nn.Linear},
        dtype=torch.qint8
    )
