"""Training of the models that label images: captioners (Florence-2) and taggers (timm)."""
