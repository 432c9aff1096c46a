"""What a feature means: its logit lens and its top activating contexts (the activation index)."""
