"""The Gradio demo (Hugging Face Space) of diffmoe_hf; run `python space/app.py` or `python -m diffmoe_hf.space.app`."""
