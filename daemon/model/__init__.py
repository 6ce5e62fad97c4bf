"""The model host process, its supervisor, prompts and the model registry."""
