"""Export stage: a trained model and its CLIP feature encoder -> a self-verifying bundle."""
