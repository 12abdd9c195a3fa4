# Configuration entraînement
training_args = TrainingArguments(
    output_dir="./results",
    num_train_epochs=3,                # Nombre epochs
    per_device_train_batch_size=4,     # Taille batch
    gradient_accumulation_steps=4,      # Accumulation gradients
    learning_rate=2e-4,                # Taux apprentissage
    logging_steps=10,                  # Fréquence logs
    save_steps=100,                    # Sauvegarde checkpoints
    save_total_limit=2,                # Limite sauvegardes
    bf16=True,                         # Précision calculs
    max_grad_norm=0.3,                 # Clip gradient
    warmup_ratio=0.03                  # Warmup ratio
)
