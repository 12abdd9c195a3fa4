def verifier_configuration():
    """
    Vérifie la compatibilité du système
    Retourne les recommandations
    """
    gpu_info = torch.cuda.get_device_properties(0)
    return {
        'memory': f"{gpu_info.total_memory/1e9:.1f}GB",
        'compute_capability': f"{gpu_info.major}.{gpu_info.minor}",
        'name': gpu_info.name
    }
