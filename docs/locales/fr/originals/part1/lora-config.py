# Paramètres adaptatifs
lora_config = LoraConfig(
    r=64,                # Rang adaptation
    lora_alpha=16,       # Scaling factor
    target_modules=[     # Modules ciblés
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj"
    ],
    bias="none",         # Configuration bias
    lora_dropout=0.05    # Dropout régularisation
)
