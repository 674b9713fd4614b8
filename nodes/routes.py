"""HTTP routes the frontend extension calls (registered only inside ComfyUI)."""
