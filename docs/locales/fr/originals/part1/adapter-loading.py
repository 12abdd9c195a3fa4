# Chargement modèle production
config = PeftConfig.from_pretrained("path/to/adapter")

model = AutoModelForCausalLM.from_pretrained(
    config.base_model_name_or_path,
    load_in_4bit=True,
    device_map="auto"
)

# Application adaptateurs
model = PeftModel.from_pretrained(
    model,
    "path/to/adapter"
)
