"""One module per component, each ``render(values) -> list[dict]`` (empty when disabled)."""
