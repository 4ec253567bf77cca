"""Import/export of foreign checkpoint formats (original PolyGLU project, Hugging Face)."""
