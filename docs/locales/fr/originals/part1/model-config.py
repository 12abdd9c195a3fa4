# Initialisation modèle quantifié
model = AutoModelForCausalLM.from_pretrained(
    "mistralai/Mistral-7B-v0.1",
    load_in_4bit=True,
    device_map="auto",
    quantization_config=BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=torch.bfloat16,  # Type calcul
        bnb_4bit_use_double_quant=True,         # Double quantification
        bnb_4bit_quant_type="nf4"              # Type quantification
    )
)
